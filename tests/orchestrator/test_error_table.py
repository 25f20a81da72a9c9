"""The one table of error categories (`orchestrator.errors.ERRORS`): total, both ways, and
what a failed call to a real server on 127.0.0.1 becomes, as a gRPC status and as the CLI's
exit code."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from typer.testing import CliRunner

import orchestrator.api.server as control
from api.squall.v1 import control_pb2 as pb
from api.squall.v1 import control_pb2_grpc as rpc
from cli.backends import RemoteBackend, ServerError
from cli.contexts import Context
from cli.main import app
from orchestrator.api.gate import Gate
from orchestrator.engine import Engine
from orchestrator.errors import (
    CATEGORY_TRAILER,
    ERRORS,
    AlreadyExists,
    Category,
    SquallError,
    category_of,
    status_of,
)
from orchestrator.provision import LocalProvisioner
from orchestrator.store import Store

TOKEN = "t" * 32
# every module that defines an error of Squall's
MODULES = [
    "orchestrator.errors",
    "orchestrator.access",
    "orchestrator.engine",
    "orchestrator.data.transfers",
    "orchestrator.provision.base",
    "orchestrator.fuzzfile.loader",
    "orchestrator.fuzzfile.upgrade",
    "orchestrator.fuzzfile.apps",
    "cli.backends",
]


def _all_errors() -> list[type[SquallError]]:
    for module in MODULES:
        importlib.import_module(module)
    found, todo = [], [SquallError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _error(category: Category) -> SquallError:
    """An error of `category` whose message says nothing of it."""
    error = SquallError(f"something about {category.value}, in words the table never reads")
    error.category = category
    return error


def test_every_error_has_a_category_and_every_category_a_rule() -> None:
    errors = _all_errors()
    assert {e.__name__ for e in errors} >= {
        "ProvisionError",
        "TransferError",
        "PullError",
        "AlreadyExists",
        "ServerError",
        "TaskNotRunning",
    }
    for cls in errors:
        if SquallError in cls.__bases__:  # a category of its own, never the root's by accident
            assert "category" in vars(cls), cls
        assert cls.category in ERRORS, cls
    assert set(ERRORS) == set(Category)
    names = {code.name for code in grpc.StatusCode}
    for rule in ERRORS.values():
        assert rule.status in names
        assert rule.exit_code in (1, 2, 3, 4)


@pytest.mark.parametrize("category", list(Category))
def test_each_category_round_trips_through_its_status(category: Category) -> None:
    status, sent = status_of(_error(category))
    assert (status, sent) == (ERRORS[category].status, category)
    assert category_of(status, sent.value) == category
    bare = category_of(status)  # no category sent: the first listed with the status
    assert ERRORS[bare].status == status
    assert category_of(ERRORS[bare].status) == bare


def test_statuses_without_a_category_read_as_their_first() -> None:
    assert category_of("ALREADY_EXISTS") is Category.ALREADY_EXISTS
    assert category_of("FAILED_PRECONDITION") is Category.CONFLICT
    assert category_of("INVALID_ARGUMENT") is Category.INVALID
    assert category_of("UNAVAILABLE") is Category.SERVER  # gRPC's own: no server there
    assert category_of("UNAUTHENTICATED") is Category.UNAUTHENTICATED
    assert category_of("PERMISSION_DENIED") is Category.DENIED
    assert category_of("FAILED_PRECONDITION", "store") is Category.CONFLICT  # not its status
    assert status_of(ValueError("boom")) == ("INTERNAL", Category.INTERNAL)


# ---- through a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, int]]:
    work = tmp_path_factory.mktemp("errors")
    store = Store(f"sqlite:///{work / 'squall.db'}")
    site = LocalProvisioner(work / "site", nodes=lambda _: [])
    engine = Engine(store, [site], data_dir=work / "data")
    server, port, _ = control.serve(engine, "127.0.0.1:0", TOKEN, workers=4)
    try:
        yield engine, port
    finally:
        server.stop(None)


@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch) -> None:
    """GetWorkflow of a run named after a category fails with an error of that category."""

    def find_run(store: Any, name: str) -> str:
        raise _error(Category(name))

    monkeypatch.setattr(control, "find_run", find_run)
    # the gate looks the run up first (for its owner): let it pass to the failing call
    monkeypatch.setattr(Gate, "owner_in", lambda self, s, of, name: (name, "admin"))


def _status(port: int, name: str) -> tuple[grpc.StatusCode, str | None]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rpc.ControlStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetWorkflow(
                pb.GetWorkflowRequest(name=name),
                metadata=(("authorization", f"Bearer {TOKEN}"),),
            )
    call: Any = caught.value
    sent = dict(call.trailing_metadata() or ()).get(CATEGORY_TRAILER)
    return call.code(), sent


def _cli(port: int, tmp_path: Path, *args: str) -> int:
    config = tmp_path / "config"
    (config / "squall").mkdir(parents=True)
    contexts = {
        "current": "t",
        "contexts": {"t": {"server": f"127.0.0.1:{port}", "token": TOKEN}},
    }
    (config / "squall" / "contexts.yaml").write_text(yaml.safe_dump(contexts))
    result = CliRunner().invoke(app, list(args), env={"XDG_CONFIG_HOME": str(config)})
    return result.exit_code


@pytest.mark.parametrize("category", [c for c in Category if c is not Category.SERVER])
def test_a_call_that_fails_with_each_category_gives_its_status_and_exit_code(
    served: tuple[Engine, int], failing: None, tmp_path: Path, category: Category
) -> None:
    _, port = served
    code, sent = _status(port, category.value)
    assert (code.name, sent) == (ERRORS[category].status, category.value)
    with pytest.raises(SquallError) as caught:
        RemoteBackend(Context("t", f"127.0.0.1:{port}", TOKEN)).status(category.value)
    assert caught.value.category is category
    assert caught.value.exit_code == ERRORS[category].exit_code
    assert _cli(port, tmp_path, "workflow", "status", category.value) == ERRORS[category].exit_code


def test_a_taken_run_name_is_already_exists_without_reading_the_words(
    served: tuple[Engine, int], tmp_path: Path
) -> None:
    engine, port = served
    hello = "version: v1\njobs:\n  hi:\n    image: {uri: docker://busybox:1.36}\n"
    hello += "    command: [/bin/true]\n"
    engine.submit("me/taken", hello)  # recorded PENDING; nothing runs
    with pytest.raises(AlreadyExists):
        engine.submit("me/taken", hello)
    with pytest.raises(AlreadyExists) as caught:
        RemoteBackend(Context("t", f"127.0.0.1:{port}", TOKEN)).start("me/taken", hello)
    assert caught.value.exit_code == 1
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rpc.ControlStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as call:
            stub.StartWorkflow(
                pb.StartWorkflowRequest(name="me/taken", fuzzfile=hello),
                metadata=(("authorization", f"Bearer {TOKEN}"),),
            )
    assert call.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]


def test_no_server_there_is_exit_3(tmp_path: Path) -> None:
    from tests.substrate.registry import free_port

    port = free_port()
    with pytest.raises(ServerError) as caught:
        RemoteBackend(Context("t", f"127.0.0.1:{port}", TOKEN)).status("me/x")
    assert caught.value.category is Category.SERVER
    assert _cli(port, tmp_path, "workflow", "status", "me/x") == 3


def test_the_cli_takes_every_exit_code_from_the_table() -> None:
    """No command names an exit code of its own: `die` takes a category, and `typer.Exit`
    gets a code from the table, the run's outcome (EXIT_RUN_FAILED) or a process's own
    (exec, the agent)."""
    import ast

    offenders = []
    for path in sorted(Path("cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = ast.unparse(node.func)
            if name == "die" and len(node.args) > 1:
                code = node.args[1]
            elif name == "typer.Exit":
                code = node.args[0]
            else:
                continue
            if isinstance(code, ast.Constant):
                offenders.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders
