"""The Go text/template subset: syntax, scoping, whitespace trimming, functions, errors.

Expected outputs follow text/template and sprig semantics as documented at
pkg.go.dev/text/template and masterminds.github.io/sprig.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from orchestrator.fuzzfile.gotemplate import FailError, TemplateError, parse, render


def run(source: str, data: dict[str, Any] | None = None, seed: int = 0) -> str:
    return render(parse(source), data or {}, rng=random.Random(seed))


@pytest.mark.parametrize(
    ("source", "data", "expected"),
    [
        ("plain text", {}, "plain text"),
        ("a: {{ .A }}", {"A": 3}, "a: 3"),
        ("{{ .A.B }}", {"A": {"B": "deep"}}, "deep"),
        ("x  {{- .A }}", {"A": 1}, "x1"),
        ("{{ .A -}}  \n\n y", {"A": 1}, "1y"),
        ("a\n{{- /* a comment */}}\nb", {}, "a\nb"),
        ("{{/* c */}}z", {}, "z"),
        ("{{ if .A }}yes{{ else }}no{{ end }}", {"A": ""}, "no"),
        ("{{ if .A }}yes{{ else }}no{{ end }}", {"A": "x"}, "yes"),
        ("{{ if eq .A 1 }}one{{ else if eq .A 2 }}two{{ else }}many{{ end }}", {"A": 2}, "two"),
        ("{{ if .Missing }}set{{ else }}unset{{ end }}", {}, "unset"),
        ("{{ range $i, $v := .L }}{{ $i }}={{ $v }};{{ end }}", {"L": ["a", "b"]}, "0=a;1=b;"),
        ("{{ range .L }}[{{ . }}]{{ else }}empty{{ end }}", {"L": []}, "empty"),
        (
            "{{ range .L }}{{ if eq . 2 }}{{ break }}{{ end }}{{ . }}{{ end }}",
            {"L": [1, 2, 3]},
            "1",
        ),
        (
            "{{ range .L }}{{ if eq . 2 }}{{ continue }}{{ end }}{{ . }}{{ end }}",
            {"L": [1, 2, 3]},
            "13",
        ),
        ("{{ with .A }}<{{ . }}>{{ else }}none{{ end }}", {"A": "v"}, "<v>"),
        ("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}", {}, "2"),
        ("{{ $x := 1 }}{{ if true }}{{ $x := 5 }}{{ end }}{{ $x }}", {}, "1"),
        ("{{ $f := false }}{{ range .L }}{{ $f = true }}{{ end }}{{ $f }}", {"L": [1]}, "true"),
        ("{{ $.A }}{{ range .L }}{{ $.A }}{{ end }}", {"A": "r", "L": [1, 2]}, "rrr"),
        ('{{ .A | printf "%s-%d" "x" }}', {"A": 4}, "x-4"),
        ('{{ (printf "%s" .A) | len }}', {"A": "four"}, "4"),
        ('{{ printf "%q|%v|%5s|%-3d|%03d|%%" "a" true "b" 7 7 }}', {}, '"a"|true|    b|7  |007|%'),
        ('{{ "a\\tb" }}|{{ `raw\\n` }}', {}, "a\tb|raw\\n"),
        ("{{ 0x10 }} {{ 1.5 }} {{ -3 }}", {}, "16 1.5 -3"),
        ("{{ nil }}", {}, "<no value>"),
        ("{{ .F }}", {"F": 1e21}, "1e+21"),
        ('{{ list 1 "a" true }}', {}, "[1 a true]"),
        ('{{ dict "b" 2 "a" 1 }}', {}, "map[a:1 b:2]"),
    ],
)
def test_syntax(source: str, data: dict[str, Any], expected: str) -> None:
    assert run(source, data) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('{{ trim "  a b \\n" }}', "a b"),
        ('{{ trimAll "/" "//a/b//" }}', "a/b"),
        ('{{ trimPrefix "volume://" "volume://user/x" }}', "user/x"),
        ('{{ "file.fasta" | trimSuffix ".fasta" }}', "file"),
        ('{{ hasPrefix "s3://" "s3://bucket" }} {{ hasPrefix "s3://" "/data" }}', "true false"),
        ('{{ hasSuffix ".git" "repo.git" }}', "true"),
        ('{{ splitList "," "a,b,,c" | join "+" }}', "a+b++c"),
        ('{{ list "/data" "x" | join "/" }}', "/data/x"),
        ('{{ default "r" "" }} {{ default "r" "julia" }} {{ default 5 0 }}', "r julia 5"),
        ('{{ substr 2 4 "2024R2" }}{{ substr 5 6 "2024R2" }}', "242"),
        ('{{ substr -1 3 "abcdef" }} {{ substr 2 99 "abcdef" }}', "abc cdef"),
        (
            '{{ base "/a/b/c.txt" }} {{ base "https://x/y/z.tar.gz" }} {{ dir "/a/b/c" }}',
            "c.txt z.tar.gz /a/b",
        ),
        ("{{ add 5 30 | max 120 }} {{ add 200 30 | max 120 }}", "120 230"),
        ("{{ mul 2 3 4 }} {{ sub 9 2 }} {{ div 7 2 }} {{ div -7 2 }} {{ mod 7 3 }}", "24 7 3 -3 1"),
        ('{{ "12" | int }} {{ "x" | int }} {{ 3.9 | int }}', "12 0 3"),
        (
            '{{ gt ("2" | int) 0 }} {{ le 1 1 }} {{ lt 1.5 2 }} {{ ne "a" "b" }}',
            "true true true true",
        ),
        ('{{ eq "a" "b" "a" }}', "true"),
        ('{{ and 1 "" 3 }}|{{ or 0 "" "x" }}|{{ not 0 }}', "|x|true"),
        ('{{ toJson (dict "k" "<v>") }}', '{"k":"\\u003cv\\u003e"}'),
        ('{{ b64enc "hi" }} {{ b64dec "aGk=" }}', "aGk= hi"),
        ('{{ regexMatch "^[0-9]+$" "123" }} {{ regexMatch "^[0-9]+$" "12a" }}', "true false"),
        ('{{ lower "ABC" }}{{ upper "d" }} {{ replace "a" "b" "aaa" }}', "abcD bbb"),
        ('{{ toString 5 }} {{ len "abc" }} {{ index (list 1 2 3) 1 }}', "5 3 2"),
        ('{{ index (dict "a" "x") "a" }} {{ index (dict "a" "x") "b" }}', "x <no value>"),
        ('{{ append (list 1) 2 }} {{ empty "" }} {{ coalesce "" "y" }}', "[1 2] true y"),
        ('{{ ternary "yes" "no" true }} {{ quote "q" }} {{ squote "s" }}', "yes \"q\" 's'"),
        ("{{ now | unixEpoch | len }}", "10"),
    ],
)
def test_sprig_functions(source: str, expected: str) -> None:
    assert run(source) == expected


def test_rand_int_is_bounded_and_seedable() -> None:
    values = {run("{{ randInt 10000 10005 }}", seed=s) for s in range(50)}
    assert values <= {str(v) for v in range(10000, 10005)}
    assert len(values) > 1
    assert run("{{ randInt 1 1000000 }}", seed=3) == run("{{ randInt 1 1000000 }}", seed=3)


def test_fail_stops_rendering_with_its_message_and_position() -> None:
    with pytest.raises(FailError) as info:
        run('ok\n{{- if not .Key }}\n  {{- fail "Key is required" }}\n{{- end }}', {"Key": ""})
    assert info.value.message == "Key is required"
    assert (info.value.line, info.value.column) == (3, 7)


@pytest.mark.parametrize(
    ("source", "data", "message", "line"),
    [
        ("a\n{{ .Nope }}", {}, "no value named 'Nope'", 2),
        ("{{ if .A }}x", {"A": 1}, "without {{end}}", 1),
        ("x {{ .A ", {"A": 1}, "unclosed action", 1),
        ("{{ end }}", {}, "unexpected {{end}}", 1),
        ("\n\n{{ frobnicate 1 }}", {}, 'function "frobnicate" not defined', 3),
        ('{{ eq 1 "1" }}', {}, "incompatible types for comparison", 1),
        ("{{ $nope }}", {}, "undefined variable $nope", 1),
        ("{{ $x = 1 }}", {}, "undefined variable $x", 1),
        ("{{ .A 1 }}", {"A": 1}, "non-function", 1),
        ("{{ range 3.5 }}{{ end }}", {}, "can't iterate", 1),
        ('{{ define "x" }}{{ end }}', {}, "not supported", 1),
        ('{{ "unterminated }}', {}, "unexpected character", 1),
        ("{{/* open", {}, "unclosed comment", 1),
        ("{{ break }}", {}, "outside range", None),
        ("{{ index (list 1) 5 }}", {}, "index out of range", 1),
    ],
)
def test_errors_name_the_cause_and_line(
    source: str, data: dict[str, Any], message: str, line: int | None
) -> None:
    with pytest.raises(TemplateError) as info:
        run(source, data)
    assert message in info.value.message
    assert info.value.line == line


def test_whitespace_trimming_keeps_yaml_indentation() -> None:
    source = (
        "resource:\n"
        "  cpu:\n"
        "    cores: {{ .Cores }}\n"
        "  {{- if gt (.GPUs | int) 0 }}\n"
        "  devices:\n"
        "    nvidia.com/gpu: {{ .GPUs }}\n"
        "  {{- end }}\n"
        "  exclusive: false\n"
    )
    assert run(source, {"Cores": 2, "GPUs": 0}) == (
        "resource:\n  cpu:\n    cores: 2\n  exclusive: false\n"
    )
    assert run(source, {"Cores": 2, "GPUs": 1}) == (
        "resource:\n  cpu:\n    cores: 2\n  devices:\n    nvidia.com/gpu: 1\n  exclusive: false\n"
    )
