"""Checks and option tables shared by the methods' option declarations.

A check takes a value and returns an error text for an invalid one, or ``None``
(:class:`cellflow.methods._base.Option`); the tables are the options that every method built on
:class:`cellflow.nn.ResponseField` and the jitted training loop reads.
"""

from __future__ import annotations

import numpy as np

from cellflow.methods._base import Option
from cellflow.nn.response import FIELDS, POOLINGS


def positive_int(value):
    return None if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0 else "expected a positive integer."


def non_negative(value):
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else "expected a number >= 0."


def positive(value):
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else "expected a number > 0."


def fraction(value):
    return None if isinstance(value, (int, float)) and 0 <= value < 1 else "expected a number in [0, 1)."


def unit_interval(value):
    return None if isinstance(value, (int, float)) and 0 < value <= 1 else "expected a number in (0, 1]."


def one_of(*choices):
    return lambda value: None if value in choices else f"valid choices: {list(choices)}."


def optional_positive_int(value):
    return None if value is None or positive_int(value) is None else "expected a positive integer or None."


def optional_path(value):
    return None if value is None or isinstance(value, str) else "expected a directory path (str) or None."


def response_field_options(
    networks: str = "the fields", *, depth_of: str = "the member field", centre: bool | None = False
) -> dict[str, Option]:
    """The architecture options that :func:`build_response_field` reads, for a method's table.

    ``networks`` names the method's networks in the help texts, ``depth_of`` what ``depth``
    counts, and ``centre`` is the default of the ``centre`` option (``None``: the method has no
    such option and builds uncentred fields).
    """
    options = {
        "width": Option(128, f"hidden width of {networks}", positive_int),
        "depth": Option(3, f"residual blocks of {depth_of}", positive_int),
        "token_dim": Option(64, "size of a combination member's token", positive_int),
        "context_dim": Option(64, "size of the covariate/population context", positive_int),
        "population_encoder": Option(True, "summarise the source population (DeepSets)", one_of(True, False)),
        "pooling": Option("mean", "pooling of member tokens: 'mean' or 'attention'", one_of(*POOLINGS)),
        "field": Option(
            "additive",
            f"structure of {networks}: 'additive' (one field per combination member plus an interaction field) "
            "or 'joint' (one field of the pooled condition; cheaper for combinations)",
            one_of(*FIELDS),
        ),
        "conditioning": Option("film", f"how conditions enter {networks}: 'film' or 'concatenation'", one_of("film", "concatenation")),
        "dropout": Option(0.0, f"dropout in {networks} and on the population summary", fraction),
    }
    if centre is not None:
        options["centre"] = Option(centre, f"feed {networks} positions relative to the source population's mean", one_of(True, False))
    return options


def optimizer_options() -> dict[str, Option]:
    """The options of :func:`cellflow.train.make_optimizer` (AdamW with warm-up and cosine decay)."""
    return {
        "learning_rate": Option(1e-3, "peak learning rate (AdamW, warm-up, cosine decay)", non_negative),
        "weight_decay": Option(0.0, "AdamW weight decay", non_negative),
        "warmup": Option(200, "warm-up steps", non_negative),
    }


def early_stopping_options(scope: str = "") -> dict[str, Option]:
    """The options of validation and early stopping (``validation_fraction``, ``eval_every``,
    ``patience``); ``scope`` says which network they apply to when a method has several (e.g.
    ``" (conditional map)"``)."""
    return {
        "validation_fraction": Option(0.0, f"share of each group's cells held out for early stopping{scope}", fraction),
        "eval_every": Option(500, "steps between validation evaluations", positive_int),
        "patience": Option(5, "evaluations without improvement before stopping", positive_int),
    }


def training_loop_options(devices_scope: str = "") -> dict[str, Option]:
    """The options of the jitted training loop (``chunk``, ``devices``, ``checkpoint_dir``,
    ``checkpoint_every``) for a method's table; ``devices_scope`` says which network ``devices``
    applies to when a method has several (e.g. ``", conditional map"``)."""
    return {
        "chunk": Option(100, "most steps per jitted dispatch (the largest divisor of steps up to this is used)", positive_int),
        "devices": Option(
            1,
            f"devices a step's condition groups are split over{devices_scope} (None: every local device that divides conditions_per_step)",
            optional_positive_int,
        ),
        "checkpoint_dir": Option(None, "directory of orbax training checkpoints", optional_path),
        "checkpoint_every": Option(1000, "steps between checkpoints", positive_int),
    }
