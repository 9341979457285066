"""Any device: circuits compute where the model lives, and device names resolve or fail in one line.

A machine without a GPU can still catch device bugs. Every case below runs under
:class:`SameDevice`, which fails any torch call whose tensor arguments sit on two devices (a 0-d
CPU tensor excepted, as CUDA allows). On the CPU that only checks that results come back on the
CPU; on the ``meta`` device, where tensors have shapes but no data, it catches every tensor that
a function creates on the CPU and mixes with the weights (``torch.arange`` without ``device=``,
a ``.cpu()`` accumulator, a random matrix from a CPU generator): meta weights plus a CPU tensor
is a mix, as it would be on a GPU. Where a function reads a value (``float(x)``, ``x.tolist()``,
a boolean mask), a meta tensor answers as if every entry were 1, so the function runs on to its
end and every later call is checked too. With CUDA, the same cases run on the GPU and are
compared with the CPU's results.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

import qkov
import qkov.circuits as C
import qkov.fourier as fourier
from qkov.circuits import FactoredMatrix
from qkov.config import DEVICES, ModelConfig, TrainConfig, check_device, parse_value
from qkov.devices import model_device, resolve_device
from qkov.errors import QkovError
from qkov.model import Transformer
from qkov.tasks import get_task

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU here")


# ------------------------------------------------------------------ the device guard
class DeviceMix(AssertionError):
    """A torch call got tensors on two devices."""


class SameDevice(TorchFunctionMode):
    """Fail any torch call that mixes devices; let meta tensors answer value reads with ones."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors((args, kwargs))
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.ndim == 0)}
        if len(devices) > 1:
            on = ", ".join(sorted(map(str, devices)))
            raise DeviceMix(f"{getattr(func, '__name__', func)} mixes tensors on {on}")
        try:
            return func(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as e:
            # A value read or a data-dependent op (nonzero, bincount, a boolean mask) on meta:
            # run it on ones on the CPU and put tensor results back on meta.
            if not any(t.is_meta for t in tensors) or "meta" not in str(e).lower() or "expected device" in str(e):
                raise
        args, kwargs = _map(lambda t: torch.ones(t.shape, dtype=t.dtype) if t.is_meta else t, (args, kwargs))
        return _map(lambda t: t.to("meta"), func(*args, **kwargs))


def _tensors(x) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _map(fn, x):
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):              # torch.return_types, named tuples
        return type(x)(*(_map(fn, v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_map(fn, v) for v in x)
    if isinstance(x, dict):
        return {k: _map(fn, v) for k, v in x.items()}
    return x


def test_the_guard_catches_a_cpu_tensor_mixed_with_meta_weights():
    W = torch.zeros(4, 4, device="meta")
    with SameDevice():
        assert (W @ torch.ones(4, device="meta")).is_meta
        assert (W * torch.tensor(2.0)).is_meta                        # a 0-d CPU scalar is fine, as on CUDA
        assert float(W.sum()) == 1.0 and W[W > 0].shape == (16,)       # a read sees ones
        with pytest.raises(DeviceMix, match="cpu, meta"):
            torch.arange(4) @ W                                       # plain torch lets this through
        with pytest.raises(DeviceMix):
            W[torch.arange(2)]                                        # a CPU index, legal on CUDA but a hidden copy
        with pytest.raises(DeviceMix):
            torch.zeros(4, 4, dtype=torch.float64).add_(W)            # a CPU accumulator


# ------------------------------------------------------------------------ the models
@dataclass
class Env:
    """The models and inputs of one device: ``attn`` (2 layers, LayerNorm, attention-only),
    ``mlp`` (a small modadd model), the modadd ``task`` and CPU inputs that ``put`` moves."""

    device: torch.device
    dtype: torch.dtype
    attn: Any
    mlp: Any
    task: Any
    tokens: Tensor                                                    # [4, 6] repeated random tokens, CPU

    def put(self, x: Tensor) -> Tensor:
        return x.to(self.device, self.dtype if x.is_floating_point() else x.dtype)

    def randn(self, *shape: int, seed: int = 0) -> Tensor:
        """CPU float64 noise (the same on every device), placed on this device."""
        return self.put(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


_TASK = get_task("modadd", p=11)


def _cpu_models() -> tuple[Transformer, Transformer]:
    attn = Transformer(ModelConfig(n_layers=2, n_heads=2, d_model=16, d_vocab=12, n_ctx=6, normalization="LN"), seed=1)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():                                             # biases and LayerNorms to fold
        for name, p in attn.named_parameters():
            if not name.split(".")[-1].startswith("W_"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    mlp = Transformer(_TASK.model_config().replace(d_model=32, n_heads=2, d_head=16, d_mlp=48), seed=2)
    return attn, mlp


def make_env(device: str, dtype: torch.dtype = torch.float32) -> Env:
    attn, mlp = _cpu_models()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    move = lambda m: copy.deepcopy(m).to(device=device, dtype=dtype)  # noqa: E731
    return Env(device, dtype, move(attn), move(mlp), _TASK, C.repeated_random_tokens(12, 3, n=4, seed=0))


# ------------------------------------------------------------------------- the cases
@dataclass
class Case:
    name: str                          # the public function or method it exercises
    fn: Callable[[Env], Any]
    tag: str = ""
    key: Callable[[Any], Any] | None = None   # what to compare across devices (default: everything)
    pending: str | None = None         # a known device bug outside qkov.circuits and qkov.fourier

    @property
    def id(self) -> str:
        return f"{self.name}:{self.tag}" if self.tag else self.name


def _fm(e: Env) -> FactoredMatrix:
    return C.full_ov(e.attn, 1, 1, pos=2)                             # [12, 12], rank 8


def _batched(e: Env) -> FactoredMatrix:
    w = C.weights(e.attn)
    return FactoredMatrix(w.W_V, w.W_O)                               # [2, 2, 16, 16]


def _pattern(e: Env) -> Tensor:
    causal = torch.ones(6, 6, dtype=torch.bool).tril().to(e.device)
    return e.randn(4, 2, 6, 6, seed=3).masked_fill(~causal, -torch.inf).softmax(-1)


def _logits(e: Env) -> Tensor:
    return e.randn(11, 11, 11, seed=4)                                # [a, b, c]



CASES = [
    # weights
    Case("weights", lambda e: C.weights(e.attn)),
    Case("weights", lambda e: C.weights(e.attn, center_unembed=False), "uncentred"),
    Case("weights", lambda e: C.weights(e.mlp), "mlp"),
    Case("to_qkov_state", lambda e: C.to_qkov_state(e.attn)[1]),
    # QK, OV and full circuits
    Case("qk", lambda e: C.qk(e.attn, 1, 0)),
    Case("qk", lambda e: C.qk(e.attn, 0, 1, include_bias=True), "bias"),
    Case("ov", lambda e: C.ov(e.attn, 1, 1)),
    Case("ov", lambda e: C.ov(e.attn, 0, 0, include_bias=True), "bias"),
    Case("full_ov", lambda e: C.full_ov(e.attn, 1, 0)),
    Case("full_ov", lambda e: C.full_ov(e.attn, 0, 1, pos=2, include_bias=True), "pos+bias"),
    Case("full_qk", lambda e: C.full_qk(e.attn, 1, 1)),
    Case("full_qk", lambda e: C.full_qk(e.attn, 0, 1, q_pos=3, k_pos=1, include_bias=True), "pos+bias"),
    Case("positional_qk", lambda e: C.positional_qk(e.attn, 0, 0, include_bias=True)),
    Case("qk_terms", lambda e: C.qk_terms(e.attn, 0, 1, 3, 2, include_bias=True, scaled=True)),
    Case("QKTerms.total", lambda e: C.qk_terms(e.attn, 1, 0, 4, 4).total()),
    Case("direct_path", lambda e: C.direct_path(e.attn, pos=1, include_bias=True)),
    Case("virtual_ov", lambda e: C.virtual_ov(e.attn, (0, 0), (1, 1), pos=2, include_bias=True)),
    # scores
    Case("copying_scores", lambda e: C.copying_scores(e.attn)),
    Case("copying_scores", lambda e: C.copying_scores(e.mlp, pos=0), "d_vocab != d_vocab_out"),
    Case("ov_self_stats", lambda e: C.ov_self_stats(e.attn)),
    Case("ov_self_stats", lambda e: C.ov_self_stats(e.attn, 1, 0, ks=(1, 3)), "one head"),
    Case("key_rank_correlation", lambda e: C.key_rank_correlation(e.attn, 1, 0, 4, 2)),
    Case("key_rank_correlation", lambda e: C.key_rank_correlation(e.attn, 0, 1, None, None, per_query=True,
                                                                  tokens=[1, 3, 5, 7]), "tokens"),
    Case("composition_scores", lambda e: {m: C.composition_scores(e.attn, m) for m in "QKV"}),
    Case("composition_scores", lambda e: C.composition_scores(e.attn, "K", baseline=True, n_samples=4), "baseline"),
    # MLP
    Case("neuron_inputs", lambda e: C.neuron_inputs(e.mlp, pos=1)),
    Case("neuron_inputs", lambda e: C.neuron_inputs(e.mlp, head=1), "one head"),
    Case("skip_inputs", lambda e: C.skip_inputs(e.mlp, pos=0)),
    Case("neuron_logits", lambda e: C.neuron_logits(e.mlp)),
    # functions that run the model
    Case("logit_attribution", lambda e: C.logit_attribution(e.attn, e.tokens)),
    Case("logit_attribution", lambda e: C.logit_attribution(e.mlp, _TASK.dataset("all").tokens[:5]), "mlp"),
    Case("head_scores", lambda e: C.head_scores(e.attn, n=4)),
    Case("head_scores", lambda e: C.head_scores(e.attn, e.put(e.tokens)), "tokens on the device"),
    Case("previous_token_scores", lambda e: C.previous_token_scores(e.attn, e.tokens)),
    Case("duplicate_token_scores", lambda e: C.duplicate_token_scores(e.attn, n=3, seed=1)),
    Case("induction_scores", lambda e: C.induction_scores(e.attn, n=3, half=2)),
    Case("detection_pattern", lambda e: C.detection_pattern(e.put(e.tokens), "induction")),
    Case("detection_score", lambda e: C.detection_score(_pattern(e), C.detection_pattern(e.tokens, "duplicate_token"))),
    # FactoredMatrix
    Case("FactoredMatrix", lambda e: FactoredMatrix(e.randn(2, 5, 3), e.randn(3, 4, seed=1))),
    Case("FactoredMatrix.AB", lambda e: _fm(e).AB),
    Case("FactoredMatrix.BA", lambda e: _batched(e).BA),
    Case("FactoredMatrix.T", lambda e: _fm(e).T),
    Case("FactoredMatrix.eigenvalues", lambda e: _batched(e).eigenvalues,
         key=lambda r: (r.abs().sort(-1).values, r.sum(-1))),        # the order is the solver's
    Case("FactoredMatrix.svd", lambda e: _batched(e).svd(),
         key=lambda r: (r[1], r[0] @ torch.diag_embed(r[1]) @ r[2].transpose(-2, -1))),   # signs are the solver's
    Case("FactoredMatrix.norm", lambda e: _batched(e).norm()),
    Case("FactoredMatrix.get_corner", lambda e: _batched(e).get_corner(4)),
    Case("FactoredMatrix.rows", lambda e: _fm(e).rows(2, 7)),
    Case("FactoredMatrix.iter_rows", lambda e: list(_fm(e).iter_rows(chunk=5))),
    Case("FactoredMatrix.topk_rows", lambda e: _fm(e).topk_rows(3, chunk=5)),
    Case("FactoredMatrix.diag_rank", lambda e: _batched(e).diag_rank(chunk=3)),
    Case("FactoredMatrix.diag_in_topk", lambda e: _fm(e).diag_in_topk([1, 4, 40])),
    Case("FactoredMatrix.diag_topk_fraction", lambda e: _batched(e).diag_topk_fraction(2)),
    Case("FactoredMatrix.diag_argmax_fraction", lambda e: _fm(e).diag_argmax_fraction()),
    Case("FactoredMatrix.unsqueeze", lambda e: _fm(e).unsqueeze(0)),
    Case("FactoredMatrix.__matmul__", lambda e: (_fm(e) @ e.randn(12), _fm(e) @ e.randn(12, 3), _fm(e) @ _fm(e).T)),
    Case("FactoredMatrix.__rmatmul__", lambda e: (e.randn(12) @ _fm(e), e.randn(2, 12) @ _fm(e))),
    Case("FactoredMatrix.__mul__", lambda e: (_fm(e) * 2.0, -_fm(e))),
    Case("FactoredMatrix.__getitem__", lambda e: (_batched(e)[1, 0], _batched(e)[1, 0, 3], _fm(e)[2:5, [0, 4]])),
    Case("FactoredMatrix.to_dense", lambda e: _batched(e).to_dense()),
    # the Fourier picture
    Case("fourier.fourier_basis", lambda e: fourier.fourier_basis(7, e.dtype, e.device)),
    Case("fourier.fft1d", lambda e: fourier.fft1d(e.randn(3, 7), dim=1)),
    Case("fourier.fft2d", lambda e: fourier.fft2d(e.randn(7, 7, 2))),
    Case("fourier.neuron_frequencies", lambda e: fourier.neuron_frequencies(e.randn(11, 11, 5))),
    Case("fourier.key_frequencies", lambda e: fourier.key_frequencies(fourier.neuron_frequencies(e.randn(11, 11, 5)))),
    Case("fourier.pair_logits", lambda e: fourier.pair_logits(e.mlp, e.task)),
    Case("fourier.neuron_grid", lambda e: fourier.neuron_grid(e.mlp, e.task)),
    Case("fourier.logit_fve", lambda e: fourier.logit_fve(_logits(e), [1, 3])),
    Case("fourier.restricted_logits", lambda e: fourier.restricted_logits(_logits(e), [2])),
    Case("fourier.excluded_logits", lambda e: fourier.excluded_logits(_logits(e), [2, 5])),
    Case("fourier.restricted_loss", lambda e: fourier.restricted_loss(_logits(e), [1])),
    Case("fourier.excluded_loss", lambda e: fourier.excluded_loss(_logits(e), [1], fourier.train_mask(e.task))),
    Case("fourier.neuron_input_spectrum", lambda e: fourier.neuron_input_spectrum(e.mlp, n_tokens=9)),
    Case("fourier.InputSpectrum.top", lambda e: fourier.neuron_input_spectrum(e.mlp).top(3)),
    Case("fourier.frequency_overlap", lambda e: fourier.frequency_overlap(e.mlp, e.mlp)),
    Case("fourier.modular_analysis", lambda e: fourier.modular_analysis(e.mlp, e.task)),
    Case("fourier.mlp_summary", lambda e: fourier.mlp_summary(e.mlp, e.task)),
]

# Public names that take no model and no tensor, or that are about a task, not a model.
NOT_ON_A_DEVICE = {
    "repeated_random_tokens": "test tokens from a CPU generator: inputs, moved to the model by the detectors",
    "random_baseline": "a Python number drawn on the CPU from its seed, the same for every model",
    "Weights": "a dataclass (its cases are weights(...))",
    "LogitAttribution": "a dataclass (its cases are logit_attribution(...))",
    "QKTerms": "a class (its cases are qk_terms(...))",
    "fourier.basis_names": "labels", "fourier.frequency_rows": "row numbers",
    "fourier.train_mask": "the task's split, on the CPU like the task's data",
}
_SHAPE = {"ldim", "mdim", "rdim", "batch_shape", "shape", "ndim", "dtype", "device", "chunk_rows"}


def _public_names() -> set[str]:
    names = set(C.__all__) - {"FactoredMatrix"}
    names |= {f"FactoredMatrix.{n}" for n in vars(FactoredMatrix) if not n.startswith("_") and n not in _SHAPE}
    names |= {f"FactoredMatrix.{n}" for n in ("__matmul__", "__rmatmul__", "__mul__", "__getitem__")}
    names.add("FactoredMatrix")
    names |= {f"fourier.{n}" for n, f in vars(fourier).items()
              if inspect.isfunction(f) and f.__module__ == fourier.__name__ and not n.startswith("_")}
    return names


def test_every_public_function_has_a_device_case():
    covered = {c.name for c in CASES} | set(NOT_ON_A_DEVICE)
    missing = sorted(n for n in _public_names() if n not in covered)
    assert not missing, f"add a Case for {missing} (or say in NOT_ON_A_DEVICE why it has no device)"


# ------------------------------------------------------------------ results and their devices
def _values(x) -> list:
    """Every tensor and number in a result, in a fixed order."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, FactoredMatrix):
        return [x.A, x.B]
    if isinstance(x, C.QKTerms):
        return _values([x.tok_tok, x.tok_pos, x.pos_tok, x.pos_pos])
    if dataclasses.is_dataclass(x):
        return _values([getattr(x, f.name) for f in dataclasses.fields(x)])
    if isinstance(x, dict):
        return _values([[k, v] for k, v in x.items()])
    if isinstance(x, (list, tuple)):
        return [v for item in x for v in _values(item)]
    return [x]


def run_case(case: Case, env: Env) -> Any:
    with torch.no_grad(), SameDevice():
        result = case.fn(env)
    devices = {t.device for t in _values(result) if isinstance(t, Tensor)}
    assert devices <= {env.device}, f"{case.id} returned tensors on {devices}; the model is on {env.device}"
    return result


def _params(*, with_pending: bool):
    out = []
    for c in CASES:
        pending = c.pending and with_pending
        marks = [pytest.mark.xfail(reason=c.pending, raises=DeviceMix, strict=False)] if pending else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


@pytest.fixture(scope="module")
def cpu_env() -> Env:
    return make_env("cpu")


@pytest.fixture(scope="module")
def meta_env() -> Env:
    return make_env("meta")


@pytest.mark.parametrize("case", _params(with_pending=False))
def test_on_the_cpu_results_stay_on_the_cpu(case, cpu_env):
    run_case(case, cpu_env)


@pytest.mark.parametrize("case", _params(with_pending=True))
def test_on_meta_weights_nothing_meets_a_cpu_tensor(case, meta_env):
    """A qkov.Transformer moved to ``meta`` (as ``.to("cuda")`` moves it): no device mix, results on meta."""
    run_case(case, meta_env)


@pytest.fixture(scope="module")
def cuda_env() -> Env:
    return make_env("cuda")


@pytest.fixture(scope="module")
def cuda_env64() -> Env:
    return make_env("cuda", torch.float64)


@pytest.fixture(scope="module")
def cpu_env64() -> Env:
    return make_env("cpu", torch.float64)


@needs_cuda
@pytest.mark.parametrize("case", _params(with_pending=True))
def test_on_cuda_results_stay_on_the_gpu(case, cuda_env):
    run_case(case, cuda_env)


@needs_cuda
@pytest.mark.parametrize("case", _params(with_pending=True))
def test_on_cuda_results_equal_the_cpu_ones(case, cuda_env64, cpu_env64):
    """In float64, so that rankings and top-k cannot flip on rounding between the two devices."""
    gpu = run_case(case, cuda_env64)
    cpu = run_case(case, cpu_env64)
    if case.key is not None:
        gpu, cpu = case.key(gpu), case.key(cpu)
    gv, cv = _values(gpu), _values(cpu)
    assert len(gv) == len(cv)
    for g, c in zip(gv, cv):
        if isinstance(g, Tensor):
            torch.testing.assert_close(g.cpu(), c, rtol=1e-6, atol=1e-9)
        elif isinstance(g, float):
            assert g == pytest.approx(c, rel=1e-6, abs=1e-9)
        else:
            assert g == c


@pytest.mark.filterwarnings("ignore::DeprecationWarning")          # TransformerLens 3.x's HookedTransformer
@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=needs_cuda)])
def test_a_transformer_lens_model_is_analysed_where_it_lives(device):
    """A HookedTransformer moved to ``device``: weights-only circuits and the ones that run it."""
    tl = pytest.importorskip("transformer_lens")
    cfg = tl.HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=6, d_head=8, n_heads=2, d_vocab=12,
                                     act_fn="relu", normalization_type="LN", attn_only=True, device="cpu", seed=0)
    model = tl.HookedTransformer(cfg).to(device)
    where = model_device(model)
    assert where.type == device
    with torch.no_grad(), SameDevice():
        results = [C.copying_scores(model), C.composition_scores(model, "K", baseline=True),
                   C.full_ov(model, 1, 0).AB, C.ov_self_stats(model)["top1"], C.key_rank_correlation(model, 1, 0, 3, 2),
                   C.induction_scores(model, n=3), C.logit_attribution(model, torch.tensor([[1, 2, 3]])).heads]
    assert [r.device for r in results] == [where] * len(results)


# ----------------------------------------------------------------------- meta models
def test_a_transformer_on_meta_reads_as_weights_on_meta():
    model = Transformer(ModelConfig(n_layers=1, n_heads=2, d_model=16, d_mlp=32, d_vocab=10, n_ctx=4)).to("meta")
    w = C.weights(model)
    assert w.device == model_device(model) == torch.device("meta")
    assert C.full_ov(model, 0, 1).device == torch.device("meta")
    assert C.copying_scores(model).shape == (1, 2) and C.copying_scores(model).is_meta


def test_factors_on_two_devices_are_a_user_mistake():
    with pytest.raises(QkovError, match="A on meta, B on cpu"):
        FactoredMatrix(torch.zeros(3, 2, device="meta"), torch.zeros(2, 3))


def test_model_device_falls_back_to_the_cpu_for_a_model_without_weights():
    assert model_device(object()) == torch.device("cpu")
    assert model_device(torch.nn.Linear(2, 2).to("meta")) == torch.device("meta")


# ------------------------------------------------------------------- TrainConfig.device
def test_train_config_device_defaults_to_cpu_and_round_trips():
    assert TrainConfig().device == "cpu"
    for name in ("cpu", "cuda", "cuda:1", "mps", "auto"):
        cfg = TrainConfig(device=name)
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "device"}   # a config.json from before
    assert TrainConfig.from_dict(old).device == "cpu"
    assert TrainConfig().replace(device=parse_value("cuda:0", "cpu", "device")).device == "cuda:0"


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:", "cuda:-1", "cuda:01", "cpu:0", "", None, 0])
def test_a_misspelt_device_is_one_line_naming_the_choices(bad):
    with pytest.raises(QkovError) as err:
        TrainConfig(device=bad)
    message = str(err.value)
    assert f"device={bad!r}" in message and ", ".join(DEVICES) in message and "\n" not in message
    with pytest.raises(QkovError):
        resolve_device(bad)


def test_check_device_returns_a_good_spelling():
    assert [check_device(n) for n in ("cpu", "cuda:12", "auto")] == ["cpu", "cuda:12", "auto"]


# ------------------------------------------------------------------------ resolve_device
def test_cpu_resolves_everywhere():
    assert resolve_device("cpu") == torch.device("cpu")
    assert torch.zeros(1).to(resolve_device("cpu")).device == resolve_device("cpu")


def test_auto_picks_the_best_device_torch_sees():
    got = resolve_device("auto")
    if CUDA:
        assert got == torch.device("cuda", torch.cuda.current_device())
    elif torch.backends.mps.is_available():
        assert got == torch.device("mps", 0)
    else:
        assert got == torch.device("cpu")


def _no_gpu(monkeypatch, build=None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", build)


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line_that_names_the_fix(monkeypatch, name):
    _no_gpu(monkeypatch)
    with pytest.raises(QkovError) as err:
        resolve_device(name)
    message = str(err.value)
    assert message == (
        f"device={name} was asked for, but torch sees no CUDA GPU here (torch {torch.__version__}, CPU build); "
        f"pass --set device=cpu or device=auto"
    )
    assert resolve_device("auto") == torch.device("cpu")


def test_a_cuda_build_without_a_driver_says_so(monkeypatch):
    _no_gpu(monkeypatch, build="12.1")
    with pytest.raises(QkovError, match=r"built for CUDA 12\.1, but no GPU or driver is visible"):
        resolve_device("cuda")


def test_mps_without_apple_silicon_is_one_line(monkeypatch):
    _no_gpu(monkeypatch)
    with pytest.raises(QkovError, match=r"^device=mps was asked for, but torch sees no Apple MPS device .*=auto$"):
        resolve_device("mps")


@needs_cuda
def test_cuda_resolves_to_an_indexed_device_and_an_absent_index_fails():
    n = torch.cuda.device_count()
    device = resolve_device("cuda")
    assert device.index is not None and torch.zeros(1, device=device).device == device
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(QkovError, match=re.escape(f"torch sees {n} CUDA GPU")):
        resolve_device(f"cuda:{n}")


# ------------------------------------------------------------------ training on a device
def test_training_on_the_cpu_by_name_and_auto_here(tmp_path):
    task = qkov.get_task("max")
    for device in ("cpu", "auto" if not torch.cuda.is_available() else "cpu"):
        cfg = task.train_config().replace(steps=20, eval_every=10, device=device)
        run = qkov.train(task, out=tmp_path / device, train_config=cfg, quiet=True)
        assert run.model.W_E.device.type == "cpu" and run.final["step"] == 20


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_training_on_a_missing_gpu_is_one_error_and_writes_nothing(tmp_path):
    task = qkov.get_task("max")
    cfg = task.train_config().replace(steps=20, device="cuda")
    with pytest.raises(qkov.QkovError, match="device=cuda was asked for, but torch sees no CUDA GPU"):
        qkov.train(task, out=tmp_path / "run", train_config=cfg, quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
@pytest.mark.parametrize("name", ["max", "add", "induction"])
def test_training_on_the_gpu_keeps_model_batches_and_eval_there(name, tmp_path):
    """The table path (max, add) or the plain forward (induction) on the GPU; the C kernel is
    CPU-only. The run saves and reloads (onto the CPU), and resumes onto the GPU."""
    from qkov.fastpath import plan

    task = qkov.get_task(name)
    cfg = task.train_config().replace(steps=40, eval_every=20, checkpoint_every=20, device="cuda")
    run = qkov.train(task, out=tmp_path / "run", train_config=cfg, quiet=True)
    assert run.model.W_E.device.type == "cuda"
    assert plan(run.model, task).kind in ("tables", "plain")
    loaded = qkov.load(tmp_path / "run")
    assert loaded.W_E.device.type == "cpu"
    torch.testing.assert_close(loaded.W_E, run.model.W_E.cpu())
    resumed = qkov.resume(tmp_path / "run", steps=60, quiet=True)
    assert resumed.model.W_E.device.type == "cuda" and resumed.final["step"] == 60


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_max_trains_to_its_target_on_the_gpu():
    task = qkov.get_task("max")
    cfg = task.train_config().replace(target_accuracy=0.999, device="cuda")
    run = qkov.train(task, train_config=cfg, quiet=True)
    assert min(g["accuracy"] for g in run.final["by_length"].values()) >= 0.999
