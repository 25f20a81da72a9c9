"""The subset of Go `text/template` and slim-sprig that Fuzzball application templates use."""

from .funcs import FailError
from .syntax import TemplateError, parse
from .render import render

__all__ = ["FailError", "TemplateError", "parse", "render"]
