"""The subset of Go `text/template` and slim-sprig that Fuzzball application templates use."""

from .funcs import FailError
from .render import render
from .syntax import TemplateError, parse

__all__ = ["FailError", "TemplateError", "parse", "render"]
