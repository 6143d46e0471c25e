"""``patch_model``: make one MLP down-projection return ``W k + gated_retrieval(k, db.keys, db.values, gamma)``.

How: a forward hook on the down-projection adds the retrieved residual to the module's own output. The module, its
weights and its class are never touched, so :func:`unpatch_model` (removing the hook) gives outputs bitwise identical
to a never-patched model, and ``generate()``, ``.to()`` and ``state_dict()`` behave as without neuraldb. While
patched, ``model.save_pretrained`` also writes the database beside the weights (:mod:`neuraldb.pretrained`).
Over 400 lines because everything a patch is (its checks, the hook, the traced op, install and removal) must agree
on one ``Patch`` record; the identity check itself lives in :mod:`neuraldb.pretrained_io`.

Under a tracer (torch.compile, export, make_fx) the hook calls one custom op,
``torch.ops.neuraldb.database_retrieval(queries, route)``, whose integer ``route`` names the patch; in eager mode
it runs the same retrieval without that op's dispatch, which would cost more host time than a decode-step kernel.
Either way the database is read at run time, under its lock. Hence:

- a forward running while another thread adds or deletes sees the old or the new database, never a mix;
- changes to the database are seen by the next forward, without re-patching;
- ``torch.compile`` traces the op as one opaque node (its fake implementation gives the output shape), so
  adding facts never triggers a recompile and the lock stays outside the graph. The op is tagged
  ``cudagraph_unsafe`` because the database's storage moves when it grows.
- the database follows the model: if a forward's activations are on another device than the database
  (after ``model.to("cuda")``), the database is moved there in place. A database shared by two models on
  different devices would move back and forth; give each model its own.
- on CUDA the lock covers launching the retrieval, not its execution; writes stay ordered after it because
  both are queued on the same (default) stream. Writers on a side stream must synchronise themselves.

Example::

    >>> import neuraldb
    >>> db = neuraldb.NeuralKVDatabase.load("edits.safetensors")      # doctest: +SKIP
    >>> neuraldb.patch_model(model, db)                               # doctest: +SKIP
    >>> with neuraldb.disabled(model):                                # doctest: +SKIP
    ...     original = model(**batch).logits
    >>> neuraldb.unpatch_model(model)                                 # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterator

import torch

from neuraldb import architectures as arch
from neuraldb import pretrained_io
from neuraldb.database import NeuralKVDatabase
from neuraldb_kernels import check_gamma, gated_retrieval, resolve, runs_eagerly

_ATTR = "_neuraldb_patch"
# What patch_model uses of a database: NeuralKVDatabase has it, and so may other stores (ShardedNeuralKVDatabase).
# ``retrieve(queries, gamma, *, backend)`` returns ``(out, idx, score)`` like gated_retrieval; an optional
# ``query_dim`` (default key_dim) is the width of the queries the patched module receives.
DATABASE_PROTOCOL = ("key_dim", "value_dim", "layer", "module_path", "gamma", "lock", "device", "to", "retrieve")
_QUERY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Live patches by route number. Weak, so a model that is garbage-collected without unpatching frees its database.
_routes: weakref.WeakValueDictionary[int, Patch] = weakref.WeakValueDictionary()
_route_numbers = itertools.count()


class Patch:
    """What :func:`patch_model` installed on a model; read it with :func:`patch_info`.

    Attributes: ``db``, ``module_path``, ``layer`` (None when patched by ``module=``), ``gamma``, ``backend``,
    ``enabled`` (False inside :func:`disabled`).
    """

    def __init__(
        self,
        db: NeuralKVDatabase,
        module_path: str,
        layer: int | None,
        gamma: float,
        backend: str | None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.db = db
        self.module_path = module_path
        self.layer = layer
        self.gamma = gamma
        self.backend = backend
        self.enabled = True
        # backend name per (device, single query row)
        self._resolved: dict[tuple[torch.device, bool], str] = {}
        # (database state token, fn) of the eager CPU path; see _retrieve
        self._fast: tuple[tuple, Callable[[torch.Tensor], torch.Tensor | None]] | None = None
        # The activation dtype the database's residuals were checked against, one of _QUERY_DTYPES (see _retrieve).
        self._dtype = dtype if dtype in _QUERY_DTYPES else None
        self._register()

    def _register(self) -> None:
        self.route = next(_route_numbers)
        _routes[self.route] = self

    # A deep copy or an unpickled copy of a patched model gets its own route, so it reads its own database copy.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "route"} | {"_fast": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._register()

    def retrieve(self, queries: torch.Tensor) -> torch.Tensor:
        """The gated residuals for the patched module's inputs ``queries``, in their dtype (zeros where no gate
        opens); moves the database to the queries' device first if it lives elsewhere."""
        out = self._retrieve(queries, eager=False)
        assert out is not None
        return out

    def _retrieve(self, queries: torch.Tensor, eager: bool) -> torch.Tensor | None:
        # eager=True: the hook's eager forward (runs_eagerly checked, queries detached). On the C++ CPU kernel it runs
        # a plan cached per database state (NeuralKVDatabase.eager_plan): one call into C++, which returns
        # None where no gate opens. Every Python step skipped here is host time a decode step no longer pays.
        db = self.db
        with db.lock:
            fast = self._fast
            # The dtype test stands for `in _QUERY_DTYPES` (self._dtype is one of them once the slow path below has
            # seen it), so a model moved to another dtype takes the slow path once, with no cost on this one.
            hit = eager and fast is not None and fast[0] is db.state_token()
            if hit and queries.is_cpu and queries.dtype is self._dtype:
                return fast[1](queries)
            if queries.dtype is not self._dtype:
                if isinstance(db, NeuralKVDatabase):
                    db.check_values_fit(queries.dtype)  # the model changed dtype since patch_model checked
                if queries.dtype in _QUERY_DTYPES:
                    self._dtype = queries.dtype
            device = queries.device
            if db.device != device:
                db.to(device)
            q = queries if queries.dtype in _QUERY_DTYPES else queries.float()
            # Only the residuals are needed, which a NeuralKVDatabase can compute from its key sketch. Its checks
            # are skipped: the patch validated gamma, the module's input has the key width, and on a decode step the
            # checks' host time (caches cold from the model's weights) would be a third of what the patch adds.
            if isinstance(db, NeuralKVDatabase) and q.shape[-1] == db.key_dim:
                rows = q.numel() // db.key_dim if db.key_dim else 0
                backend = self._backend_on(device, rows == 1)
                # The plan serves every row count, so only where both kinds of call resolve to the C++ kernel.
                cpu = backend == "cpu" and self._backend_on(device, rows != 1) == "cpu"
                plan = db.eager_plan(self.gamma, rows) if eager and cpu else None
                if plan is not None:
                    self._fast = (plan[0], plan[1].residuals)
                    out = plan[1].residuals(q)
                else:
                    out = db.gated_residuals(q, self.gamma, backend)
            else:
                out, _, _ = db.retrieve(q, self.gamma, backend=self.backend)
        return out if out is None or out.dtype == queries.dtype else out.to(queries.dtype)

    def _backend_on(self, device: torch.device, one_row: bool) -> str:
        # Resolved once per device and kind of call ("auto" may pick another backend for a single query row);
        # $NEURALDB_BACKEND is read when the patch first runs so.
        key = (device, one_row)
        name = self._resolved.get(key)
        if name is None:
            name = self._resolved[key] = resolve(self.backend, device, 1 if one_row else None)
        return name

    def __repr__(self) -> str:
        return (
            f"Patch(module_path={self.module_path!r}, layer={self.layer}, gamma={self.gamma}, "
            f"backend={self.backend!r}, enabled={self.enabled}, db={self.db!r})"
        )


def _patch_for(route: int) -> Patch:
    patch = _routes.get(route)
    if patch is None:
        raise RuntimeError(f"neuraldb route {route} is not patched any more (the model was unpatched)")
    return patch


@torch.library.custom_op("neuraldb::database_retrieval", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _database_retrieval(queries: torch.Tensor, route: int) -> torch.Tensor:
    return _patch_for(route).retrieve(queries)


@_database_retrieval.register_fake
def _(queries: torch.Tensor, route: int) -> torch.Tensor:
    return queries.new_empty((*queries.shape[:-1], _patch_for(route).db.value_dim))


# The retrieved residual is piecewise constant in the query, so its gradient is zero almost everywhere; this
# lets a patched model be trained or used to optimise new residuals.
_database_retrieval.register_autograd(lambda ctx, grad: (None, None), setup_context=lambda ctx, inputs, output: None)


class _RetrievalHook:
    def __init__(self, patch: Patch) -> None:
        self.patch = patch

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        patch = self.patch
        if not patch.enabled:
            return output
        query = args[0] if args else next(iter(kwargs.values()))
        if runs_eagerly(query):
            # The residual is a constant of the query (the op's derivative is zero), so autograd need not see it.
            residual = patch._retrieve(query.detach() if query.requires_grad else query, eager=True)
            if residual is None:  # no gate opened: the module's own output, not a copy plus zeros
                return output
        else:
            residual = torch.ops.neuraldb.database_retrieval(query, patch.route)
        return output + (residual if residual.dtype == output.dtype else residual.to(output.dtype))


def _resolve(
    model: torch.nn.Module, db: NeuralKVDatabase, layer: int | None, module: str | torch.nn.Module | None
) -> tuple[str, torch.nn.Module, int | None]:
    if module is not None:
        if isinstance(module, torch.nn.Module):
            found = [name for name, m in model.named_modules() if m is module]
            if not found:
                raise ValueError("module must be a submodule of model (or its path), got a module outside it")
            path, target = found[0], module
        else:
            path, target = arch.find_module(model, module)
        if layer is not None:
            arch.check_layer(model, layer)
        return path, target, layer
    if layer is None and db.module_path is not None:
        path, target = arch.find_module(model, db.module_path)
        return path, target, db.layer
    if layer is None:
        layer = db.layer if db.layer is not None else arch.default_layer(model)
    path, target = arch.down_proj_module(model, layer)
    return path, target, layer


def _device_of(module: torch.nn.Module) -> torch.device | None:
    param = next(module.parameters(), None)
    return None if param is None else param.device


def patch_model(
    model: torch.nn.Module,
    db: NeuralKVDatabase,
    *,
    layer: int | None = None,
    gamma: float | None = None,
    module: str | torch.nn.Module | None = None,
    backend: str | None = None,
    force: bool = False,
) -> torch.nn.Module:
    """Patch ``model`` in place so that one MLP down-projection adds ``db``'s gated retrieval to its output.

    Args:
        model: a Hugging Face causal LM (any family in :data:`neuraldb.architectures.ARCHITECTURES`) or any
            module when ``module`` is given.
        db: the database; its ``key_dim``/``value_dim`` must be the module's input/output features. It is moved
            to the module's device.
        layer: which layer's down-projection; defaults to ``db.module_path``, then ``db.layer``, then the
            architecture's default layer.
        gamma: gate threshold in [-1, 1]; defaults to ``db.gamma``, then the architecture's default (0.65).
        module: the module itself or its path (e.g. ``"model.layers.8.mlp.down_proj"``), for architectures
            neuraldb does not know or to patch a different projection.
        backend: the ``gated_retrieval`` backend (None: best available, or ``$NEURALDB_BACKEND`` as it is when the
            patch first runs on a device; the choice is kept until the model moves to another device).
        force: patch even when ``db`` was made for other weights or another architecture (a warning instead of the
            :class:`~neuraldb.pretrained.ModelMismatchError`).

    Returns:
        ``model``, patched. Patching a patched model replaces the previous patch cleanly (the old hook is removed
        only after the new arguments have been validated), so at most one database is active per model.

    Raises:
        TypeError / ValueError naming the argument: wrong types, unknown architecture without ``module``, layer out of
        range, database dims that do not match the module, bad gamma or backend, residuals beyond the range of the
        module's dtype (an fp32 or bf16 database in an fp16 model; they would make the logits inf).
        :class:`~neuraldb.pretrained.ModelMismatchError` (a ValueError): ``db.model_identity`` records another
        architecture or other weights than ``model``'s (:func:`neuraldb.pretrained.check_model`; a database without
        a recorded identity, from an older file or built by hand, is checked by its dimensions and, where both sides
        have one, the base model's Hub id). On error the model (and any previous patch) is left unchanged. A forward after the model moved to a narrower dtype raises the same
        ValueError; facts added after patching are checked against the storage dtype only.

    Example::

        >>> db = neuraldb.NeuralKVDatabase(1536, 576)                      # doctest: +SKIP
        >>> neuraldb.patch_model(model, db, layer=8, gamma=0.65)           # doctest: +SKIP
        >>> neuraldb.patch_info(model).module_path                         # doctest: +SKIP
        'model.layers.8.mlp.down_proj'
    """
    return _patch(model, db, layer, gamma, module, backend, identity=lambda: _check_identity(model, db, force))


def patch_checked(
    model: torch.nn.Module, db: NeuralKVDatabase, *, gamma: float | None = None, backend: str | None = None
) -> torch.nn.Module:
    """:func:`patch_model` for a caller that has checked the model's identity itself and reported it in its own words
    (``neuraldb.from_pretrained`` against the directory's record, the CLI with ``--force``)."""
    return _patch(model, db, None, gamma, None, backend, identity=None)


def _check_identity(model: torch.nn.Module, db: NeuralKVDatabase, force: bool) -> None:
    pretrained_io.check_model(
        model, pretrained_io.recorded_identity(db), force=force, source="db", warn_unverifiable=False, stacklevel=6
    )


def _patch(
    model: torch.nn.Module,
    db: NeuralKVDatabase,
    layer: int | None,
    gamma: float | None,
    module: str | torch.nn.Module | None,
    backend: str | None,
    identity: Callable[[], None] | None,
) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(db, NeuralKVDatabase) and not all(hasattr(db, a) for a in DATABASE_PROTOCOL):
        raise TypeError(
            f"db must be a neuraldb.NeuralKVDatabase (or provide {', '.join(DATABASE_PROTOCOL)}), "
            f"got {type(db).__name__}"
        )
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    path, target, layer = _resolve(model, db, layer, module)
    key_dim, value_dim = arch.down_proj_dims(target)
    query_dim = getattr(db, "query_dim", db.key_dim)  # a tensor-parallel database takes a slice of the key
    if (query_dim, db.value_dim) != (key_dim, value_dim):
        raise ValueError(
            f"db has key_dim={query_dim}, value_dim={db.value_dim} but {path} maps {key_dim} -> {value_dim} "
            "features; the database was built for another layer or model"
        )
    if gamma is None:
        gamma = db.gamma if db.gamma is not None else arch.default_gamma(model)
    gamma = check_gamma(gamma)
    if identity is not None:
        identity()
    _warn_if_inconsistent(db, path, layer)
    weight = next((p for p in target.parameters() if p.is_floating_point()), None)
    if weight is not None and isinstance(db, NeuralKVDatabase):
        db.check_values_fit(weight.dtype)

    device = _device_of(target)
    if device is not None and device.type != "meta":
        with db.lock:
            db.to(device)
            # A dry run on one zero query validates the backend for this device before anything is installed. On
            # the CPU it reads one row of a NeuralKVDatabase, not all of them: a scan of every key would cost a
            # 1M-fact database seconds, and evict the caches of the forward that follows. On a GPU it scans them
            # all (milliseconds), because Triton autotunes its scan on the first call of each shape of query.
            weight_dtype = next(target.parameters()).dtype
            dtype = weight_dtype if weight_dtype in _QUERY_DTYPES else torch.float32
            probe = torch.zeros(1, key_dim, dtype=dtype, device=device)
            if isinstance(db, NeuralKVDatabase) and device.type == "cpu":
                gated_retrieval(probe, db.keys[:1], db.values[:1], gamma, backend=backend)
            else:
                db.retrieve(probe, gamma, backend=backend)

    if patch_info(model) is not None:
        unpatch_model(model)
    _install(model, target, Patch(db, path, layer, gamma, backend, None if weight is None else weight.dtype))
    return model


def _install(model: torch.nn.Module, target: torch.nn.Module, patch: Patch) -> None:
    # Also puts back a patch that unpatch_model removed, with the caches its first forward built (benchmarks time
    # patched and unpatched forwards alternately without paying those again).
    target.register_forward_hook(_RetrievalHook(patch), with_kwargs=True)
    setattr(model, _ATTR, patch)
    pretrained_io.wrap_save_pretrained(model, patch_info)
    _routes[patch.route] = patch


def _warn_if_inconsistent(db: NeuralKVDatabase, path: str, layer: int | None) -> None:
    if db.module_path is not None and not (db.module_path.endswith(path) or path.endswith(db.module_path)):
        warnings.warn(
            f"db was built for {db.module_path!r} but is being patched into {path!r}", UserWarning, stacklevel=4
        )
    elif db.layer is not None and layer is not None and db.layer != layer:
        warnings.warn(
            f"db was built for layer {db.layer} but is being patched into layer {layer}", UserWarning, stacklevel=4
        )


def patch_info(model: torch.nn.Module) -> Patch | None:
    """The :class:`Patch` installed on ``model`` by :func:`patch_model`, or None.

    Example::

        >>> neuraldb.patch_info(model).gamma      # doctest: +SKIP
        0.65
    """
    patch = getattr(model, _ATTR, None)
    return patch if isinstance(patch, Patch) else None


def _require_patch(model: torch.nn.Module) -> Patch:
    patch = patch_info(model)
    if patch is None:
        raise ValueError(f"model ({type(model).__name__}) is not patched by neuraldb.patch_model")
    return patch


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Remove the patch: the model computes exactly what it computed before :func:`patch_model`.

    Raises ValueError when ``model`` is not patched.

    Example::

        >>> neuraldb.unpatch_model(model) is model   # doctest: +SKIP
        True
    """
    patch = _require_patch(model)
    target = model.get_submodule(patch.module_path)
    # By identity rather than a stored handle, so a deep copy of a patched model unpatches its own module.
    keys = [k for k, h in target._forward_hooks.items() if isinstance(h, _RetrievalHook) and h.patch is patch]
    for hooks in (target._forward_hooks, target._forward_hooks_with_kwargs, target._forward_hooks_always_called):
        for key in keys:
            hooks.pop(key, None)
    delattr(model, _ATTR)
    pretrained_io.unwrap_save_pretrained(model)
    _routes.pop(patch.route, None)
    return model


@contextlib.contextmanager
def disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Turn retrieval off inside a ``with`` block (the model computes as if unpatched); nests and restores.

    Example::

        >>> with neuraldb.disabled(model):            # doctest: +SKIP
        ...     before = model(**batch).logits
    """
    patch = _require_patch(model)
    previous = patch.enabled
    patch.enabled = False
    try:
        yield model
    finally:
        patch.enabled = previous
