{{/*
Expand the name of the chart.
*/}}
{{- define "neoplasma-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A default fully qualified app name, at most 63 characters (a DNS label). A release name that
already contains the chart name is used as is.
*/}}
{{- define "neoplasma-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "neoplasma-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object of the chart, without app.kubernetes.io/component.
*/}}
{{- define "neoplasma-operator.commonLabels" -}}
helm.sh/chart: {{ include "neoplasma-operator.chart" . }}
app.kubernetes.io/name: {{ include "neoplasma-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: neoplasma
{{- end }}

{{/*
Labels on the operator's objects.
*/}}
{{- define "neoplasma-operator.labels" -}}
{{ include "neoplasma-operator.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Selector labels of the operator pod (stable across upgrades; the helm test pod has another
component, so the metrics Service never selects it).
*/}}
{{- define "neoplasma-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "neoplasma-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The name of the operator's ServiceAccount.
*/}}
{{- define "neoplasma-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "neoplasma-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image the operator runs, and the default image of NeoplasmaClusters: repository:tag, the
tag defaulting to the chart's appVersion.
*/}}
{{- define "neoplasma-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The operator's RBAC rules (rbac/rules.yaml): `include "neoplasma-operator.rules" (list . "namespaced")`
or `(list . "cluster")` renders that list of PolicyRules.
*/}}
{{- define "neoplasma-operator.rules" -}}
{{- $root := index . 0 }}
{{- $scope := index . 1 }}
{{- $rules := $root.Files.Get "rbac/rules.yaml" | fromYaml }}
{{- if not (hasKey $rules $scope) }}
{{- fail (printf "rbac/rules.yaml has no %q rules (or does not parse: %v)" $scope (get $rules "Error")) }}
{{- end }}
{{- toYaml (get $rules $scope) }}
{{- end }}

{{/*
The namespaces watched, as a list without duplicates (empty: all namespaces).
*/}}
{{- define "neoplasma-operator.watchNamespaces" -}}
{{- toJson (uniq .Values.watchNamespaces) }}
{{- end }}
