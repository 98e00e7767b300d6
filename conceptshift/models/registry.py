"""The model families by name: one line registers a family, and generic code (the CLI, the
experiments, the contract tests) finds it here instead of importing concrete classes.

Example:
  >>> from conceptshift.models.registry import family, family_names
  >>> family("regression", n_components=2).n_components
  2
  >>> "gated" in family_names()
  True
"""

from __future__ import annotations

from .gated import GatedExperts
from .glm import BinomialMixture, CategoricalMixture, LogisticMixture, PoissonRegressionMixture
from .hmm import HMMMixture
from .regression import RegressionMixture
from .softmax_gated import SoftmaxGatedExperts

FAMILIES: dict[str, type] = {}
EXAMPLES: dict[str, dict] = {}


def register_family(name: str, cls: type, example: dict | None = None) -> type:
    """Registers ``cls`` (a frozen dataclass of hyperparameters) under ``name``; returns it.

    ``example``: the hyperparameters, beyond ``n_components`` and ``n_heads``, of a small
    instance (for the contract tests and examples; ``{}`` when the defaults do)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a family name must be an identifier, got {name!r}")
    if not isinstance(cls, type):
        raise TypeError(f"cls must be a class, got {type(cls).__name__}")
    if name in FAMILIES and FAMILIES[name] is not cls:
        raise ValueError(f"a family named {name!r} is already registered ({FAMILIES[name].__name__})")
    FAMILIES[name] = cls
    EXAMPLES[name] = dict(example or {})
    return cls


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def family_class(name: str) -> type:
    """The class registered under ``name``; a ValueError lists the known names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_name(model) -> str:
    """The name a family instance is registered under."""
    for name, cls in FAMILIES.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered family")


def check_family(model, caller: str, *, em_kinds: tuple[str, ...] | None = None,
                 needs: tuple[str, ...] = ()):
    """Refuses, before anything is traced, a ``model`` that is not an instance of a registered
    family, one whose ``em_kind`` is not among ``em_kinds``, or one without the protocol methods
    ``needs``: generic code asks what a family can do, never which class it is. Returns ``model``.

    Raises:
      TypeError: naming the argument, the caller and what was expected.
    """
    if not isinstance(model, tuple(FAMILIES.values())):
        hint = ""
        dtype = getattr(model, "dtype", None)
        if dtype is not None and "key" in str(dtype):
            hint = f": the model comes first, then the key ({caller}(model, key, ...))"
        raise TypeError(f"model must be an instance of a registered family ({', '.join(FAMILIES)}; "
                        f"see conceptshift.models.registry), got {type(model).__name__}{hint}")
    name = type(model).__name__
    if em_kinds is not None and model.em_kind not in em_kinds:
        raise TypeError(f"model must be a family fitted by {' or '.join(em_kinds)} EM for {caller}; "
                        f"{name} is fitted by {model.em_kind} EM (use fit_em, which fits every family)")
    missing = [m for m in needs if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(f"model must provide {', '.join(missing)} for {caller}; {name} does not yet")
    return model


def family(name: str, **hyperparameters):
    """An instance of the family registered under ``name``."""
    return family_class(name)(**hyperparameters)


def family_example(name: str, n_components: int = 2, n_heads: int = 2):
    """A small instance of the family registered under ``name`` (its registered example)."""
    family_class(name)
    return family(name, n_components=n_components, n_heads=n_heads, **EXAMPLES[name])


register_family("regression", RegressionMixture)
register_family("gated", GatedExperts)
register_family("softmax", SoftmaxGatedExperts)
register_family("hmm", HMMMixture, example={"n_states": 2, "n_tokens": 4})
register_family("logistic", LogisticMixture)
register_family("categorical", CategoricalMixture, example={"n_classes": 3})
register_family("poisson", PoissonRegressionMixture)
register_family("binomial", BinomialMixture,
                example={"n_features": 2, "trials_column": 1, "trials_per_row": 5})
