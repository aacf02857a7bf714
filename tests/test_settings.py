"""Settings are checked where they are declared: on the command line and in the config dataclasses alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from neoplasma.broker.settings import BrokerConfig
from neoplasma.cli import build_parser
from neoplasma.core.settings import InvalidSetting, Settings
from neoplasma.operator.settings import OperatorConfig
from neoplasma.proxy.settings import ProxyConfig

REPO = Path(__file__).resolve().parents[1]
PORT = "from 0 to 65535 (0: any free port)"


def test_a_proxy_with_drain_rate_0_does_not_start() -> None:
    """It used to start, then crash dividing by zero on SIGTERM."""
    result = subprocess.run([sys.executable, "-m", "neoplasma", "proxy", "--drain-rate", "0"], capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "argument --drain-rate: must be a number greater than 0, not '0'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["proxy", "--drain-rate", "-5"], "--drain-rate: must be a number greater than 0, not '-5'"),
    (["proxy", "--heartbeat", "0"], "--heartbeat: must be a number greater than 0, not '0'"),
    (["proxy", "--heartbeat", "nan"], "--heartbeat: must be a number greater than 0, not 'nan'"),
    (["proxy", "--retry-ms", "0"], "--retry-ms: must be an integer greater than 0, not '0'"),
    (["proxy", "--drain-retry-ms", "1.5"], "--drain-retry-ms: must be an integer greater than 0, not '1.5'"),
    (["proxy", "--control-port", "65536"], f"--control-port: must be an integer {PORT}, not '65536'"),
    (["broker", "--grpc-port", "-1"], f"--grpc-port: must be an integer {PORT}, not '-1'"),
    (["broker", "--max-event-bytes", "0"], "--max-event-bytes: must be an integer greater than 0, not '0'"),
    (["broker", "--max-outbox-bytes", "0"], "--max-outbox-bytes: must be an integer greater than 0, not '0'"),
    (["broker", "--publisher-window", "inf"], "--publisher-window: must be a number greater than 0, not 'inf'"),
    (["broker", "--publisher-window", "soon"], "--publisher-window: must be a number greater than 0, not 'soon'"),
    (["operator", "--liveness-port", "0"], "--liveness-port: must be an integer from 1 to 65535, not '0'"),
    (["operator", "--metrics-port", "-1"], "--metrics-port: must be an integer from 0 to 65535 (0: off), not '-1'"),
    (["operator", "--scale-interval", "0"], "--scale-interval: must be a number greater than 0, not '0'"),
    (["up", "--scale-interval", "-1"], "--scale-interval: must be a number greater than 0, not '-1'"),
    (["up", "--brokers", "-1"], "--brokers: must be an integer 0 or more, not '-1'"),
    (["subscribe", "--count", "-1", "t"], "--count: must be an integer 0 or more, not '-1'"),
])
def test_out_of_bounds_options_are_refused_saying_what_is_allowed(
        args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(args)
    assert exit_.value.code == 2
    assert f"neoplasma {args[0]}: error: argument {message}" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "setting", "value"), [
    (["broker", "--grpc-port", "0", "--http-port", "0"], "grpc_port", 0),  # 0: any free port
    (["proxy", "--brokers", "a:1,b:2", "--heartbeat", "0.25"], "brokers", ["a:1", "b:2"]),
    (["operator", "--metrics-port", "0"], "metrics_port", 0),  # 0: off
    (["operator", "--namespace", "a", "--namespace", "b"], "namespaces", ["a", "b"]),
])
def test_values_within_bounds_reach_the_config(args: list[str], setting: str, value: Any) -> None:
    config_class: type[Settings] = {"broker": BrokerConfig, "proxy": ProxyConfig, "operator": OperatorConfig}[args[0]]
    assert getattr(config_class.from_args(build_parser().parse_args(args)), setting) == value


def test_an_environment_default_is_checked_as_the_option_would_be(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEOPLASMA_PUBLISHER_WINDOW", "2.5")
    assert BrokerConfig.from_args(build_parser().parse_args(["broker"])).publisher_window == 2.5
    monkeypatch.setenv("NEOPLASMA_PUBLISHER_WINDOW", "0")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["broker"])


@pytest.mark.parametrize(("config_class", "setting", "value", "allowed"), [
    (ProxyConfig, "drain_rate", 0, "a number greater than 0"),
    (ProxyConfig, "max_grpc_buffer", 0, "an integer greater than 0"),
    (ProxyConfig, "linger_seconds", -0.1, "a number 0 or more"),
    (BrokerConfig, "http_port", 70000, f"an integer {PORT}"),
    (BrokerConfig, "drain_timeout", float("nan"), "a number 0 or more"),
    (OperatorConfig, "liveness_port", 0, "an integer from 1 to 65535"),
])
def test_a_config_built_in_code_is_checked_too(
        config_class: type[Settings], setting: str, value: Any, allowed: str) -> None:
    with pytest.raises(InvalidSetting) as error:
        config_class(**{setting: value})
    assert error.value.setting == setting
    assert str(error.value) == f"{setting} must be {allowed}, not {value!r}"


def test_the_operator_refuses_one_port_for_two_endpoints() -> None:
    result = subprocess.run([sys.executable, "-m", "neoplasma", "operator", "--metrics-port", "8080"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "--metrics-port and --liveness-port are both 8080; choose two different ports" in result.stderr


def test_kopf_run_is_refused_pointing_at_neoplasma_operator(tmp_path: Path) -> None:
    """`neoplasma operator` is the one way to start the operator; kopf stops before it watches anything."""
    kopf = Path(sys.executable).with_name("kopf")
    result = subprocess.run([str(kopf), "run", "--standalone", "--all-namespaces", "-m", "neoplasma.operator.handlers"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")})
    assert result.returncode != 0
    assert "start it with `neoplasma operator` (`kopf run` is not supported)" in result.stderr
