"""Run an image encoder (a JAX function or a flax nnx module) over images in jitted batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx
from tqdm.auto import tqdm

from cellflow._errors import CellflowValueError

__all__ = ["embed_images"]


def _compiled_encoder(encoder_fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    if isinstance(encoder_fn, nnx.Module):
        # split once, so the weights are an argument of the compiled function, not constants
        # baked into it, and the module is never mutated by the call
        graphdef, state = nnx.split(encoder_fn)
        apply = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
        return lambda images: apply(state, images)
    if not callable(encoder_fn):
        raise CellflowValueError(f"encoder_fn must be callable (a function or an nnx.Module), got {type(encoder_fn).__name__}.")
    return jax.jit(encoder_fn)


def embed_images(
    images: Any,
    encoder_fn: Callable[[jax.Array], jax.Array],
    batch_size: int = 256,
    *,
    obs: pd.DataFrame | None = None,
    key_added: str | None = None,
    progress: bool = False,
) -> ad.AnnData:
    """Embed images with a user's encoder, batch by batch under :func:`jax.jit`.

    The last batch is padded to ``batch_size``, so the encoder compiles once whatever the
    number of images; batches are dispatched without waiting for the previous one and read
    back to the host once at the end.

    Parameters
    ----------
    images
        Array of shape ``(n_images, ...)`` (e.g. ``(n, height, width, channels)``), numpy or JAX,
        any dtype the encoder accepts; passed to the encoder as is, so do any scaling there.
    encoder_fn
        A function or a flax :class:`~flax.nnx.Module` mapping a batch of shape
        ``(batch_size, ...)`` to embeddings of shape ``(batch_size, n_features)``. A pure
        function of its input (e.g. a ViT-MAE or DINO encoder with its weights closed over, or
        a module in eval mode) so that it can be jitted.
    batch_size
        Images per call of the encoder.
    obs
        Optional per-image metadata, ``n_images`` rows (plate, well, compound, ...).
    key_added
        ``None`` (default): the embeddings are ``X``. Otherwise they go to ``obsm[key_added]``
        and ``X`` is empty, to be used as ``rep=key_added``.
    progress
        Show a progress bar over batches.

    Returns
    -------
    anndata.AnnData
        ``n_images`` rows; embeddings as float32 in ``X`` or ``obsm[key_added]``; ``obs`` a copy
        of ``obs`` (or a default index ``"0", "1", ...``).

    Examples
    --------
    >>> encoder = MyViT(rngs=nnx.Rngs(0))          # any nnx module: (b, h, w, c) -> (b, d)
    >>> encoder.eval()
    >>> cells = cf.pp.embed_images(crops, encoder, batch_size=128, obs=metadata)
    >>> wells = cf.pp.aggregate(cells, by=["plate", "well"])
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise CellflowValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not hasattr(images, "shape") or len(images.shape) < 2:
        raise CellflowValueError(
            f"images must be an array of shape (n_images, ...), got {type(images).__name__} of shape "
            f"{getattr(images, 'shape', None)}."
        )
    n = int(images.shape[0])
    if n == 0:
        raise CellflowValueError("images holds no image (shape[0] == 0).")
    if obs is not None and len(obs) != n:
        raise CellflowValueError(f"obs has {len(obs)} rows but images has {n} images.")
    encode = _compiled_encoder(encoder_fn)
    batch_size = min(int(batch_size), n)
    outputs = []
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc="embedding", disable=not progress, unit="batch"):
        batch = jnp.asarray(images[start : start + batch_size])
        size = batch.shape[0]
        if size < batch_size:
            pad = jnp.zeros((batch_size - size, *batch.shape[1:]), dtype=batch.dtype)
            batch = jnp.concatenate([batch, pad])
        embedded = encode(batch)
        if embedded.ndim != 2 or embedded.shape[0] != batch_size:
            raise CellflowValueError(
                f"encoder_fn must return embeddings of shape (batch, n_features) = ({batch_size}, d); got shape "
                f"{tuple(embedded.shape)} for input batch of shape {tuple(batch.shape)}."
            )
        outputs.append(embedded[:size])
    embeddings = np.asarray(jnp.concatenate(outputs), dtype=np.float32)
    if not np.isfinite(embeddings).all():
        bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
        raise CellflowValueError(f"encoder_fn returned NaN or inf for {bad.size} image(s), first indices {bad[:5].tolist()}.")
    frame = obs.copy() if obs is not None else pd.DataFrame(index=pd.RangeIndex(n))
    frame.index = pd.Index([str(i) for i in frame.index])
    if key_added is None:
        var = pd.DataFrame(index=pd.Index([f"embedding_{j}" for j in range(embeddings.shape[1])]))
        return ad.AnnData(X=embeddings, obs=frame, var=var)
    result = ad.AnnData(X=np.zeros((n, 0), dtype=np.float32), obs=frame)
    result.obsm[key_added] = embeddings
    return result
