"""Variables in command and args, and the legacy `${{ secret "NAME" }}` placeholder: the
expander itself, and what validation says about them."""

from __future__ import annotations

import textwrap

import pytest

from orchestrator.fuzzfile import load_text
from orchestrator.fuzzfile.variables import (
    expand,
    fill_legacy_secrets,
    secret_references,
    variables,
)

ENV = {"FB_TASK_ID": "7", "WORK": "/work dir", "EMPTY": ""}


@pytest.mark.parametrize(
    ("text", "expanded"),
    [
        ("$FB_TASK_ID", "7"),
        ("${FB_TASK_ID}", "7"),
        ("part-$FB_TASK_ID.txt", "part-7.txt"),  # a name ends where letters/digits/_ end
        ("${WORK}/out", "/work dir/out"),  # one argument, spaces and all: no word splitting
        ("$WORK$FB_TASK_ID", "/work dir7"),
        ("[$EMPTY]", "[]"),  # defined as empty is defined
        ("$$", "$"),
        ("$$FB_TASK_ID", "$FB_TASK_ID"),  # escaped: the literal name
        ("$${FB_TASK_ID}", "${FB_TASK_ID}"),
        ("$$$FB_TASK_ID", "$7"),
        ("$UNDEFINED and ${UNDEFINED}", "$UNDEFINED and ${UNDEFINED}"),  # left as written
        ("$FB_TASK_IDX", "$FB_TASK_IDX"),  # another (undefined) name
        ("$(hostname) ${WORK:-x} $1 $ {WORK}", "$(hostname) ${WORK:-x} $1 $ {WORK}"),
        ("cost: 5$", "cost: 5$"),
        ('${{ secret "X" }}', '${{ secret "X" }}'),  # not a variable
    ],
)
def test_expand(text: str, expanded: str) -> None:
    assert expand(text, ENV) == expanded


def test_expansion_is_one_pass() -> None:
    """A value that holds `$NAME` is not expanded again (as in Kubernetes)."""
    assert expand("$A", {"A": "$B", "B": "no"}) == "$B"
    assert expand("$A", {"A": "$$"}) == "$$"


def test_variables_names_what_would_be_expanded() -> None:
    assert list(variables("$A ${B} $$C $(d) $1 ${E:-x}")) == ["A", "B"]


def test_legacy_placeholders_name_user_secrets() -> None:
    assert secret_references('${{ secret "TOKEN" }}') == ["secret://user/TOKEN"]
    assert secret_references('Bearer ${{secret "A"}}, ${{ secret  "B" }}') == [
        "secret://user/A",
        "secret://user/B",
    ]
    assert secret_references('${{ secret "secret://user/C" }}') == ["secret://user/C"]
    assert secret_references("secret://user/D") == ["secret://user/D"]
    assert secret_references("plain $VALUE") == []
    values = {"secret://user/A": "a-value", "secret://user/B": "b-value"}
    filled = fill_legacy_secrets('Bearer ${{ secret "A" }}/${{ secret "B" }}', values.__getitem__)
    assert filled == "Bearer a-value/b-value"


def check(body: str) -> list[tuple[str, str, str, int | None]]:
    result = load_text("version: v4\n" + textwrap.dedent(body), "wf.yaml")
    return [(d.severity.value, d.code, d.field, d.line) for d in result.diagnostics]


def test_variables_that_stay_literal_are_warned_about() -> None:
    found = check("""
        jobs:
          one:
            image: {uri: docker://busybox}
            command: [/bin/echo, "$FB_TASK_ID", "$$FB_TASK_ID", "$TOKEN", "$FB_WORKFLOW_ID"]
            args: ["$FB_TYPO", "$HOME"]
            env: [TOKEN=secret://user/TOKEN]
          many:
            image: {uri: docker://busybox}
            command: [/bin/sleep, "$FB_TASK_ID"]
            task-array: {start: 1, end: 2}
    """)
    warnings = [(code, field, line) for severity, code, field, line in found]
    assert sorted(warnings) == [
        ("variable-secret", "jobs.one.command[3]", 6),
        ("variable-undefined", "jobs.one.args[0]", 7),
        ("variable-undefined", "jobs.one.command[1]", 6),
    ]
    assert {severity for severity, *_ in found} == {"warning"}


def test_legacy_secrets_are_accepted_deprecated_and_checked() -> None:
    found = check("""
        jobs:
          one:
            image:
              uri: docker://registry.example.com/team/app:1
              secrets: {username: robot, password: '${{ secret "REGISTRY_PW" }}'}
            command: [/bin/true]
            env: ['TOKEN=${{ secret "TOKEN" }}']
    """)
    assert sorted((s, c) for s, c, _, _ in found) == [
        ("warning", "deprecated-image-secrets"),
        ("warning", "deprecated-secret-placeholder"),
    ]


@pytest.mark.parametrize(
    ("image", "env", "code", "field"),
    [
        ("secrets: {username: robot, password: plain-text}", "", "image-secrets", "secrets"),
        ("secrets: {password: '${{ secret \"P\" }}'}", "", "image-secrets", "secrets"),
        ("secrets: {username: r, password: '${{ secret \"a/b\" }}'}", "", "secret-ref", "secrets"),
        ("", "['T=${{ secret \"secret://group/T\" }}']", "env-secret-scope", "env[0]"),
        ("", "['T=${{ secret \"..\" }}']", "secret-ref", "env[0]"),
        (
            "{secret: secret://user/R, secrets: {username: r, password: '${{ secret \"P\" }}'}}",
            "",
            "image-secret-twice",
            "secrets",
        ),
    ],
)
def test_bad_legacy_secrets_are_refused(image: str, env: str, code: str, field: str) -> None:
    if image.startswith("{"):
        image_yaml = f"image: {{uri: docker://r.example.com/a, {image[1:-1]}}}"
    else:
        image_yaml = "image: {uri: docker://r.example.com/a" + (f", {image}" if image else "") + "}"
    found = check(f"""
        jobs:
          one:
            {image_yaml}
            command: [/bin/true]
            env: {env or "[]"}
    """)
    errors = [(c, f) for s, c, f, _ in found if s == "error"]
    where = f"jobs.one.image.{field}" if "secrets" in field else f"jobs.one.{field}"
    assert (code, where) in errors, found


def test_a_secrets_map_on_a_transfer_is_refused() -> None:
    found = check("""
        volumes:
          data:
            ingress:
              - source: {uri: "s3://bucket/in", secrets: {accessKeyId: x}}
                destination: {uri: "file://in"}
        jobs:
          one: {image: {uri: docker://busybox}, command: [/bin/true]}
    """)
    assert ("error", "transfer-secrets", "volumes.data.ingress[0].source.secrets", 6) in found
