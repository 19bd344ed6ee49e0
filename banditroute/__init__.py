"""banditroute: an LLM router that learns online from bandit feedback, on Ray."""

__version__ = "0.1.0"

from pathlib import Path as _Path

# A bare checkout (not pip-installed: a GPU box, or a Ray worker that finds the
# repo on sys.path before site-packages): the component folders (serve/,
# policy/, ...) sit beside this package and are its subpackages, as
# pyproject.toml's package-dir maps them for an install.
_CHECKOUT = _Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "serve" / "__init__.py").is_file():
    if str(_CHECKOUT) not in __path__:
        __path__.append(str(_CHECKOUT))
