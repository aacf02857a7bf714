"""Every shell example in the docs works as written.

The examples are read from the README, e2e/README.md, the chart's README and NOTES, docs/*.md and the
comments at the top of examples/*.yaml (fenced `sh` blocks, indented command blocks, `# command`
comment lines), plus the inline `neoplasma ...` and `python bench/...` commands of the prose.

- Examples that can run on one machine (`neoplasma publish|subscribe`, `curl` to a broker or proxy)
  are run against `neoplasma up`, started as the README says, with the example's host and port
  replaced by the local broker's or proxy's (by what the command does: `/publish` goes to a broker,
  `?eventType=` and `neoplasma subscribe` to a proxy, `neoplasma publish` to a broker's gRPC port).
  Streaming commands start first; every other command must exit 0; every event published must reach a
  subscriber the test opens on its topic, and every streaming command of the example whose topics
  cover it.
- Cluster-only commands (kubectl, helm, docker, ...) are checked: `bash -n`, the files and scripts
  they name exist, `--set` keys are in the chart's values, `neoplasma.io/` annotations exist in the
  code, `kubectl` resource names are the CRD's, and every `neoplasma` flag is in `--help`.
A command whose first word no rule covers fails the test: add a rule rather than skip it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import proxy_status, sse, stop_process, wait_for

from neoplasma.core.topics import SEPARATOR
from neoplasma.core.trust import Access, Tokens

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "neoplasma-operator"
MARKDOWN = [ROOT / "README.md", ROOT / "e2e" / "README.md", CHART / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOTES = CHART / "templates" / "NOTES.txt"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SHELL_FENCES = {"sh", "bash", "shell", "console"}

# What each command's first word is: run here, or checked only (it needs a cluster, a registry, root, or
# runs for long). `neoplasma` is decided by its subcommand below.
CHECKED_ONLY = {"kubectl", "helm", "docker", "kind", "minikube", "sudo", "source", "pip", "openssl", "grpcurl",
                "scripts/test.sh", "scripts/k8s-node.sh", "scripts/k8s-control-plane.sh", "scripts/lock.sh",
                "e2e/run.sh", "python", "python3"}
RUN_HERE = {"curl", "neoplasma"}
NEOPLASMA_RUN = {"publish", "subscribe"}  # the rest (up, broker, proxy, operator, ...) are started, not run


@dataclass
class Example:
    where: str  # file:line
    commands: list[str]
    inline: bool = False  # a command quoted in prose: flags and names checked, never run

    @property
    def text(self) -> str:
        return "\n".join(self.commands)


def _join_continuations(lines: list[str]) -> list[str]:
    joined: list[str] = []
    current = ""
    for line in lines:
        line = line.rstrip()
        if current:
            current += " " + line.strip()
        else:
            current = line.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        if current and not current.startswith("#"):
            joined.append(current)
        current = ""
    if current:
        joined.append(current)
    return joined


def _command_words(command: str) -> list[str]:
    """The command's words without the VAR=value assignments before it."""
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        words = words[1:]
    return words


def _first_word(command: str) -> str:
    words = _command_words(command)
    return words[0] if words else ""


def _is_command(line: str) -> bool:
    try:
        word = _first_word(line)
    except ValueError:
        return False
    return word in CHECKED_ONLY or word in RUN_HERE


def markdown_examples(path: Path) -> Iterator[Example]:
    lines = path.read_text().splitlines()
    rel = path.relative_to(ROOT)
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)", lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if fence.group(1) in SHELL_FENCES:
                yield Example(f"{rel}:{i + 1}", _join_continuations(lines[i + 1:end]))
            i = end + 1
            continue
        # An indented code block (after a blank line) whose first line is a command.
        if lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()) and _is_command(lines[i]):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            yield Example(f"{rel}:{i + 1}", _join_continuations(lines[i:end]))
            i = end
            continue
        for span in re.findall(r"`((?:neoplasma|python3? bench/)[^`]*)`", lines[i]):
            if span.startswith("neoplasma ") or span.startswith("python"):
                yield Example(f"{rel}:{i + 1}", [span], inline=True)
        i += 1


def notes_examples() -> Iterator[Example]:
    # NOTES.txt is a template: its actions become a placeholder word before the commands are read.
    text = re.sub(r"\{\{-?.*?-?\}\}", "NAME", NOTES.read_text())
    lines = text.splitlines()
    rel = NOTES.relative_to(ROOT)
    for i, line in enumerate(lines):
        if line.startswith("     ") and _is_command(line):
            block = [line]
            for follow in lines[i + 1:]:
                if not block[-1].rstrip().endswith("\\"):
                    break
                block.append(follow)
            yield Example(f"{rel}:{i + 1}", _join_continuations(block))


def yaml_comment_examples(path: Path) -> Iterator[Example]:
    commands: list[str] = []
    first = 0
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.startswith("#"):
            break
        text = re.sub(r"^#\s*(?:[A-Z][a-z]+:)?\s*", "", line)
        if text and _is_command(text):
            commands.append(text)
            first = first or i + 1
    if commands:
        yield Example(f"{path.relative_to(ROOT)}:{first}", commands)


def all_examples() -> list[Example]:
    found = [e for path in MARKDOWN for e in markdown_examples(path)]
    found += list(notes_examples())
    found += [e for path in EXAMPLES for e in yaml_comment_examples(path)]
    return found


def simple_commands(example: Example) -> list[str]:
    """Each command of the example, split at `&&`, `;` and `|` (quotes respected)."""
    out: list[str] = []
    for command in example.commands:
        lexer = shlex.shlex(command, posix=True, punctuation_chars="&|;")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        parts: list[list[str]] = [[]]
        for token in lexer:
            if token in {"&&", "||", "|", ";", "&"}:
                parts.append([])
            else:
                parts[-1].append(token)
        out += [shlex.join(p) for p in parts if p]
    return out


# -- names that must exist -------------------------------------------------------------------------


@functools.cache
def neoplasma_flags(subcommand: str) -> set[str]:
    args = [subcommand, "--help"] if subcommand else ["--help"]
    result = subprocess.run([sys.executable, "-m", "neoplasma", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"neoplasma {subcommand} --help failed: {result.stderr[-500:]}"
    return set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", result.stdout))


@functools.cache
def neoplasma_subcommands() -> set[str]:
    result = subprocess.run([sys.executable, "-m", "neoplasma", "--help"], capture_output=True, text=True, timeout=60)
    listed = set(re.findall(r"^ {4}([a-z][a-z0-9-]*) {2,}", result.stdout, re.M))
    assert "up" in listed, result.stdout
    return listed


@functools.cache
def known_annotations() -> set[str]:
    names: set[str] = set()
    for source in ROOT.glob("*/neoplasma/**/*.py"):
        text = source.read_text()
        names |= set(re.findall(r"neoplasma\.io/([a-z0-9][a-z0-9-]*)", text))
        if 'PREFIX = "neoplasma.io/"' in text or "scaling.PREFIX" in text or "PREFIX +" in text:
            names |= set(re.findall(r'PREFIX \+ "([a-z0-9-]+)"', text))
    return names


@functools.cache
def crd_names() -> set[str]:
    crd = yaml.safe_load((CHART / "crds" / "neoplasmaclusters.yaml").read_text())
    names = crd["spec"]["names"]
    found = {names["plural"], names["singular"], *names.get("shortNames", [])}
    return found | {f"{n}.{crd['spec']['group']}" for n in list(found)}


@functools.cache
def chart_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def check_names(example: Example) -> list[str]:
    problems: list[str] = []
    for annotation in re.findall(r"neoplasma\.io/([a-z0-9][a-z0-9-]*)", example.text):
        if annotation not in known_annotations() and annotation not in {"v1alpha1"}:
            problems.append(f"annotation neoplasma.io/{annotation} is not used by the code")
    for command in simple_commands(example):
        words = _command_words(command)
        first = words[0]
        if first == "...":  # "and so on", as in `kubectl get nodes; ...`
            continue
        if first not in CHECKED_ONLY | RUN_HERE:
            problems.append(f"{command!r}: no rule for {first!r} (tests/test_docs.py CHECKED_ONLY or RUN_HERE)")
            continue
        if first.startswith(("scripts/", "e2e/")) and not (ROOT / first).is_file():
            problems.append(f"{command!r}: {first} does not exist")
        if first == "neoplasma":
            problems += _check_neoplasma(command, words[1:])
        for i, word in enumerate(words):
            if word in {"-f", "--filename"} and i + 1 < len(words):
                path = words[i + 1]
                if not path.startswith(("http", "-", "NAME")) and not (ROOT / path).exists() \
                        and not (CHART / path).exists():
                    problems.append(f"{command!r}: file {path} does not exist")
            if re.fullmatch(r"(bench|charts|examples|crds|scripts|e2e|docs)/[\w./-]+", word) \
                    and not (ROOT / word).exists():
                problems.append(f"{command!r}: {word} does not exist")
            if word == "--set" and i + 1 < len(words) and first == "helm":
                problems += _check_values(command, words[i + 1])
        if first == "kubectl":
            for word in words[1:]:
                if re.fullmatch(r"(npc|neoplasmaclusters?)(\.[a-z.]+)?", word) and word not in crd_names():
                    problems.append(f"{command!r}: {word} is not a name of the NeoplasmaCluster CRD")
        if first in {"python", "python3"} and len(words) > 1 and (ROOT / words[1]).is_file():
            problems += _check_flags(command, words[2:], _script_flags(words[1]), words[1])
    return problems


def _check_neoplasma(command: str, args: list[str]) -> list[str]:
    global_flags = neoplasma_flags("")
    while args and args[0].startswith("-"):
        flag = args.pop(0).split("=")[0]
        if flag not in global_flags:
            return [f"{command!r}: neoplasma has no option {flag}"]
        if flag == "--log-level" and args:
            args.pop(0)
    if not args or re.fullmatch(r"[A-Z]+", args[0]):  # a placeholder: `neoplasma COMMAND --help`
        return []
    if args[0] not in neoplasma_subcommands():
        return [f"{command!r}: neoplasma has no command {args[0]!r}"]
    return _check_flags(command, args[1:], neoplasma_flags(args[0]), f"neoplasma {args[0]}")


@functools.cache
def _script_flags(script: str) -> frozenset[str]:
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, f"{script} --help failed: {result.stderr[-500:]}"
    return frozenset(re.findall(r"(--[a-z0-9][a-z0-9-]*)", result.stdout))


def _check_flags(command: str, args: list[str], allowed: set[str] | frozenset[str], what: str) -> list[str]:
    return [f"{command!r}: {what} has no option {arg.split('=')[0]}"
            for arg in args if arg.startswith("--") and arg.split("=")[0] not in allowed]


def _check_values(command: str, setting: str) -> list[str]:
    problems = []
    for assignment in setting.split(","):
        key = assignment.split("=")[0]
        node: Any = chart_values()
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                problems.append(f"{command!r}: --set {key}: no such key in {CHART.name}/values.yaml")
                break
            node = node[part]
    return problems


# -- the tests -------------------------------------------------------------------------------------


def test_the_docs_have_examples() -> None:
    examples = all_examples()
    where = {e.where.split(":")[0] for e in examples if not e.inline}
    assert {"README.md", "e2e/README.md", "charts/neoplasma-operator/README.md",
            "charts/neoplasma-operator/templates/NOTES.txt", "examples/small.yaml",
            "examples/production.yaml"} <= where, where
    assert any(_runnable(e) for e in examples)


@pytest.mark.parametrize("example", all_examples(), ids=lambda e: e.where)
def test_example_is_valid_shell_with_names_that_exist(example: Example) -> None:
    if not example.inline:
        syntax = subprocess.run(["bash", "-n"], input=example.text, capture_output=True, text=True)
        assert syntax.returncode == 0, f"{example.where}: {syntax.stderr}"
    problems = check_names(example)
    assert not problems, f"{example.where}:\n" + "\n".join(problems)


def test_the_checks_catch_wrong_names() -> None:
    """The name checks are not vacuous: each kind of mistake is found."""
    wrong = Example("x", ["neoplasma proxy --no-such-flag 1", "neoplasma nosuchcommand",
                          "kubectl annotate npc x neoplasma.io/no-such-annotation=1", "kubectl get neoplasmaclustrs",
                          "helm install x charts/neoplasma-operator --set image.nosuchkey=1",
                          "kubectl apply -f examples/nosuch.yaml", "frobnicate --now", "python bench/nosuch.py"])
    problems = "\n".join(check_names(wrong))
    for expected in ("--no-such-flag", "nosuchcommand", "no-such-annotation", "image.nosuchkey",
                     "examples/nosuch.yaml", "no rule for 'frobnicate'", "bench/nosuch.py"):
        assert expected in problems, (expected, problems)


# -- running the local examples --------------------------------------------------------------------


@dataclass
class Cluster:
    brokers: list[dict[str, str]]
    proxies: list[dict[str, str]]
    access: Access
    tried: list[str] = field(default_factory=list)  # the commands `neoplasma up` prints to try


def _runnable(example: Example) -> bool:
    if example.inline:
        return False
    for command in simple_commands(example):
        words = shlex.split(command)
        if words[0] == "curl" and re.search(r"(127\.0\.0\.1|localhost|NODE_IP):", command):
            return True
        if words[0] == "neoplasma" and len(words) > 1 and words[1] in NEOPLASMA_RUN:
            return True
    return False


# The commands run as a user's shell would, with this Python's `neoplasma` first on PATH.
SHELL_ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
_HOST = re.compile(r"(?:127\.0\.0\.1|localhost|NODE_IP):(?:PORT|\d+)")


def localize(command: str, cluster: Cluster) -> str:
    """The command with its host:port replaced by the local broker's or proxy's that it means."""
    words = shlex.split(command)
    if words[0] == "neoplasma":
        port = cluster.proxies[0]["http"] if "subscribe" in words else cluster.brokers[0]["grpc"]
    elif "/publish" in command:
        port = cluster.brokers[0]["http"]
    else:
        port = cluster.proxies[0]["http"]
    return _HOST.sub(port, command)


def _streams(words: list[str]) -> bool:
    if words[0] == "curl":
        return "-N" in words or "--no-buffer" in words
    return words[1] == "subscribe" and "--count" not in words


def _topics_of(words: list[str]) -> list[str]:
    if words[0] == "curl":
        url = next(w for w in words if "eventType=" in w)
        return re.search(r"eventType=([^&]*)", url).group(1).split(",")  # type: ignore[union-attr]
    return [w for w in words[2:] if (not w.startswith("-") and not _HOST.search(w) and ":" in w) or w == "demo"]


def _published(words: list[str]) -> list[tuple[str, Any]]:
    """The (topic, data) of each event a publishing command sends."""
    if words[0] == "neoplasma":
        args = [w for w in words[2:] if not w.startswith("-") and not re.search(r":\d+$", w)]
        return [(args[0], json.loads(args[1]))]
    body = next(words[i + 1] for i, w in enumerate(words) if w in {"-d", "--data", "--data-raw"})
    parsed = json.loads(body)
    return [(e["meta"]["type"], e["data"]) for e in (parsed if isinstance(parsed, list) else [parsed])]


def _covers(topics: list[str], topic: str) -> bool:
    return any(topic == t or topic.startswith(t + SEPARATOR) for t in topics)


def _data_seen(output: str) -> list[Any]:
    seen = []
    for line in output.splitlines():
        text = line[len("data:"):].strip() if line.startswith("data:") else line.strip()
        try:
            value = json.loads(text)
        except ValueError:
            continue
        seen.append(value)
        if isinstance(value, dict) and "data" in value:
            seen.append(value["data"])
    return seen


async def run_example(example: Example, cluster: Cluster, tmp_path: Path) -> None:
    commands = [c for c in simple_commands(example) if _first_word(c) in RUN_HERE]
    local = [localize(c, cluster) for c in commands if _runnable(Example(example.where, [c]))]
    streaming = [c for c in local if _streams(shlex.split(c))]
    once = [c for c in local if c not in streaming]
    published = [event for c in once for event in (_published(shlex.split(c)) if _publishes(c) else [])]
    proxy = cluster.proxies[0]
    before = (await proxy_status(proxy["control"], cluster.access)).subscribers
    running: list[tuple[str, asyncio.subprocess.Process, Path]] = []
    try:
        for i, command in enumerate(streaming):
            out = tmp_path / f"stream-{i}.out"
            with out.open("wb") as sink:
                proc = await asyncio.create_subprocess_exec("bash", "-c", command, stdout=sink,
                                                            stderr=asyncio.subprocess.STDOUT, cwd=ROOT, env=SHELL_ENV)
            running.append((command, proc, out))
        topics = sorted({t for t, _ in published})
        async with sse(proxy["http"], ",".join(topics) or "unused") as own:
            async def subscribed() -> bool:
                for command, proc, out in running:
                    assert proc.returncode is None, f"{example.where}: {command!r} exited: {out.read_text()[-500:]}"
                status = await proxy_status(proxy["control"], cluster.access)
                return status.subscribers >= before + len(streaming) + 1
            await wait_for(subscribed, timeout=60, what=f"{example.where}: its subscribers connected")
            for command in once:
                shell = await asyncio.create_subprocess_exec("bash", "-c", command, stdout=asyncio.subprocess.PIPE,
                                                             stderr=asyncio.subprocess.STDOUT, cwd=ROOT, env=SHELL_ENV)
                output, _ = await asyncio.wait_for(shell.communicate(), 30)
                assert shell.returncode == 0, (f"{example.where}: {command!r} exited {shell.returncode}: "
                                               f"{output.decode(errors='replace')[-500:]}")
            if published:
                try:
                    await wait_for(lambda: len(own.events) >= len(published), timeout=10,
                                   what=f"{example.where}: the events it published ({published})")
                except AssertionError as exc:
                    raise AssertionError(f"{exc}; received {own.events}") from None
                assert sorted(json.dumps(d) for _, d in published) == sorted(json.dumps(e["data"])
                                                                             for e in own.events)
            for command, _, out in running:
                wanted = [d for t, d in published if _covers(_topics_of(shlex.split(command)), t)]
                await wait_for(lambda out=out, wanted=wanted: all(d in _data_seen(out.read_text()) for d in wanted),
                               timeout=10, what=f"{example.where}: {command!r} to print {wanted}")
    finally:
        for _, proc, _ in running:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


def _publishes(command: str) -> bool:
    words = shlex.split(command)
    return (words[0] == "neoplasma" and words[1] == "publish") or "/publish" in command


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """`neoplasma up` exactly as the README's first command, its endpoints read from the table it prints."""
    log = tmp_path_factory.mktemp("up") / "up.log"
    proc = subprocess.Popen([sys.executable, "-m", "neoplasma", "up"], stdout=subprocess.PIPE,
                            stderr=log.open("wb"), text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while not any(line.startswith("Ctrl-C") for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, f"neoplasma up: {lines} {log.read_text()}"
            lines.append(proc.stdout.readline())
        rows = [line.split() for line in lines if re.match(r"^(broker|proxy)-\d", line)]
        credential = next(re.search(r"credential in (\S+):", line).group(1)  # type: ignore[union-attr]
                          for line in lines if "credential in" in line)
        yield Cluster(
            brokers=[{"grpc": r[1], "http": r[2]} for r in rows if r[0].startswith("broker")],
            proxies=[{"grpc": r[1], "http": r[2], "control": r[3]} for r in rows if r[0].startswith("proxy")],
            access=Access(Tokens(given=[Path(credential).read_text().strip()])),
            tried=[line.strip() for line in lines if line.startswith("  neoplasma ")])
    finally:
        stop_process(proc, timeout=20)


RUNNABLE = [e for e in all_examples() if _runnable(e)]


@pytest.mark.parametrize("example", RUNNABLE, ids=lambda e: e.where)
async def test_example_runs_against_neoplasma_up(example: Example, cluster: Cluster, tmp_path: Path) -> None:
    await run_example(example, cluster, tmp_path)


async def test_the_commands_neoplasma_up_prints_work(cluster: Cluster, tmp_path: Path) -> None:
    assert len(cluster.tried) == 2 and len(cluster.brokers) == 2 and len(cluster.proxies) == 2, cluster
    await run_example(Example("neoplasma up", cluster.tried), cluster, tmp_path)


async def test_a_publish_the_broker_refuses_fails_its_example(cluster: Cluster, tmp_path: Path) -> None:
    """The runner is not vacuous: a curl publish without its JSON content type (answered 415) fails."""
    body = json.dumps({"meta": {"type": "t"}, "data": 1})
    refused = Example("x", ["curl -N 'http://127.0.0.1:PORT/?eventType=t'",
                            f"curl -XPOST http://127.0.0.1:PORT/publish -d '{body}'"])
    with pytest.raises(AssertionError, match="the events it published"):
        await run_example(refused, cluster, tmp_path)
