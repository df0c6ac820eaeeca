"""Real models: a GPT-style language model, and every module kind of torch.nn with parameters."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from kfac_ef import KFACPreconditioner

from .helpers import seed_preconditioner
from .models import GPT, lm_loss


def state_bytes(pre: KFACPreconditioner) -> int:
    """Bytes of every floating-point tensor the preconditioner holds (unique storages),
    found by walking its attributes; the model's own modules and parameters excluded."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack: list[object] = [pre]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module | nn.Parameter):
            continue
        if isinstance(obj, Tensor):
            if obj.is_floating_point() and obj.device.type != "meta":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not callable(obj):
            stack.extend(vars(obj).values())
    return sum(storages.values())


@pytest.mark.slow
def test_gpt_builds_stays_within_plan_and_memorizes_a_batch():
    torch.manual_seed(0)
    vocab = 50257
    model = GPT(vocab=vocab, attention=("mha", "sdpa"))
    pre = seed_preconditioner(model, other_params="diagonal", damping=0.1, inv_update_steps=5)
    s = pre.summary()
    rows = {r.name: r for r in s.layers}
    assert rows["head"].g_factor == "diagonal" and rows["wpe"].a_factor == "diagonal"
    assert "wte" not in rows and s.ties[0][0] == "wte.weight"
    assert {f"blocks.0.attn.attn.{p}_proj" for p in "qkv"} <= set(rows)
    assert {"blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.0.attn.attn.out_proj"} <= set(rows)
    assert s.unpreconditioned == ()  # everything is preconditioned, norms diagonally
    assert s.total_bytes < 4 * 2**20  # nothing vocabulary-squared (50257² floats = 9.4 GiB)
    planned = s.total_bytes

    x = torch.randint(0, vocab, (4, 17))
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    losses = []
    for _ in range(7):
        opt.zero_grad()
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        pre.step()
        opt.step()
        losses.append(loss.item())
        assert state_bytes(pre) <= planned
    assert losses[-1] < 0.5 * losses[0], losses
    assert state_bytes(pre) > 0.9 * planned  # the plan is not a loose bound either


# ---------------------------------------------------------------------------------------
# Every module kind of torch.nn that has parameters: works, or is listed with a reason.


def _x(*shape):
    return lambda: (torch.randn(*shape),)


def _idx(*shape, high=5):
    return lambda: (torch.randint(0, high, shape),)


def _transformer(kind):
    def make():
        enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        return {
            nn.Transformer: lambda: nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True),
            nn.TransformerEncoder: lambda: nn.TransformerEncoder(
                enc, 2, enable_nested_tensor=False
            ),
            nn.TransformerDecoder: lambda: nn.TransformerDecoder(dec, 2),
            nn.TransformerEncoderLayer: lambda: enc,
            nn.TransformerDecoderLayer: lambda: dec,
        }[kind]()

    return make


_TWO_SEQS = lambda: (torch.randn(2, 5, 8), torch.randn(2, 3, 8))  # noqa: E731
_ONE_SEQ = _x(2, 5, 8)

COVERED = "covered"
# kind -> (factory, inputs or None (not run), expected: COVERED or a substring of the reason)
CASES: dict[type[nn.Module], tuple] = {
    nn.Linear: (lambda: nn.Linear(4, 3), _x(2, 4), COVERED),
    nn.Bilinear: (
        lambda: nn.Bilinear(3, 4, 2),
        lambda: (torch.randn(2, 3), torch.randn(2, 4)),
        COVERED,
    ),
    nn.Conv1d: (lambda: nn.Conv1d(2, 3, 2), _x(2, 2, 5), COVERED),
    nn.Conv2d: (lambda: nn.Conv2d(2, 3, 2), _x(2, 2, 4, 4), COVERED),
    nn.Conv3d: (lambda: nn.Conv3d(2, 3, 2), _x(2, 2, 3, 3, 3), COVERED),
    nn.Embedding: (lambda: nn.Embedding(5, 3), _idx(2, 4), COVERED),
    nn.MultiheadAttention: (
        lambda: nn.MultiheadAttention(8, 2),
        lambda: (torch.randn(5, 2, 8),) * 3,
        COVERED,
    ),
    nn.LayerNorm: (lambda: nn.LayerNorm(4), _x(2, 3, 4), COVERED),
    nn.RMSNorm: (lambda: nn.RMSNorm(4), _x(2, 3, 4), COVERED),
    nn.GroupNorm: (lambda: nn.GroupNorm(2, 4), _x(2, 4, 3), COVERED),
    nn.InstanceNorm1d: (lambda: nn.InstanceNorm1d(3, affine=True), _x(2, 3, 5), COVERED),
    nn.InstanceNorm2d: (lambda: nn.InstanceNorm2d(3, affine=True), _x(2, 3, 4, 4), COVERED),
    nn.InstanceNorm3d: (lambda: nn.InstanceNorm3d(3, affine=True), _x(2, 3, 3, 3, 3), COVERED),
    nn.PReLU: (lambda: nn.PReLU(3), _x(2, 3, 4), COVERED),
    nn.AdaptiveLogSoftmaxWithLoss: (
        lambda: nn.AdaptiveLogSoftmaxWithLoss(8, 10, cutoffs=[4]),
        lambda: (torch.randn(6, 8), torch.tensor([0, 1, 5, 7, 9, 2])),
        COVERED,
    ),
    nn.Transformer: (_transformer(nn.Transformer), _TWO_SEQS, COVERED),
    nn.TransformerEncoder: (_transformer(nn.TransformerEncoder), _ONE_SEQ, COVERED),
    nn.TransformerDecoder: (_transformer(nn.TransformerDecoder), _TWO_SEQS, COVERED),
    nn.TransformerEncoderLayer: (_transformer(nn.TransformerEncoderLayer), _ONE_SEQ, COVERED),
    nn.TransformerDecoderLayer: (_transformer(nn.TransformerDecoderLayer), _TWO_SEQS, COVERED),
    nn.ConvTranspose1d: (lambda: nn.ConvTranspose1d(2, 3, 2), _x(2, 2, 5), "transposed"),
    nn.ConvTranspose2d: (lambda: nn.ConvTranspose2d(2, 3, 2), _x(2, 2, 4, 4), "transposed"),
    nn.ConvTranspose3d: (lambda: nn.ConvTranspose3d(2, 3, 2), _x(2, 2, 3, 3, 3), "transposed"),
    nn.EmbeddingBag: (lambda: nn.EmbeddingBag(5, 3), _idx(2, 4), "EmbeddingBag"),
    nn.BatchNorm1d: (lambda: nn.BatchNorm1d(3), _x(4, 3), "batch statistics"),
    nn.BatchNorm2d: (lambda: nn.BatchNorm2d(3), _x(4, 3, 2, 2), "batch statistics"),
    nn.BatchNorm3d: (lambda: nn.BatchNorm3d(3), _x(4, 3, 2, 2, 2), "batch statistics"),
    nn.SyncBatchNorm: (lambda: nn.SyncBatchNorm(3), None, "batch statistics"),
    nn.RNN: (lambda: nn.RNN(4, 3), _x(5, 2, 4), "recurrent"),
    nn.LSTM: (lambda: nn.LSTM(4, 3), _x(5, 2, 4), "recurrent"),
    nn.GRU: (lambda: nn.GRU(4, 3), _x(5, 2, 4), "recurrent"),
    nn.RNNBase: (lambda: nn.RNNBase("LSTM", 4, 3), None, "recurrent"),
    nn.RNNCell: (lambda: nn.RNNCell(4, 3), _x(2, 4), "recurrent"),
    nn.LSTMCell: (lambda: nn.LSTMCell(4, 3), _x(2, 4), "recurrent"),
    nn.GRUCell: (lambda: nn.GRUCell(4, 3), _x(2, 4), "recurrent"),
    nn.RNNCellBase: (lambda: nn.RNNCellBase(4, 3, True, 2), None, "recurrent"),
    nn.ParameterList: (lambda: nn.ParameterList([nn.Parameter(torch.ones(3))]), None, "custom"),
    nn.ParameterDict: (
        lambda: nn.ParameterDict({"a": nn.Parameter(torch.ones(3))}),
        None,
        "custom",
    ),
}
for _lazy, _args in {
    nn.LazyLinear: (3,),
    nn.LazyConv1d: (3, 2),
    nn.LazyConv2d: (3, 2),
    nn.LazyConv3d: (3, 2),
    nn.LazyConvTranspose1d: (3, 2),
    nn.LazyConvTranspose2d: (3, 2),
    nn.LazyConvTranspose3d: (3, 2),
    nn.LazyBatchNorm1d: (),
    nn.LazyBatchNorm2d: (),
    nn.LazyBatchNorm3d: (),
    nn.LazyInstanceNorm1d: (),
    nn.LazyInstanceNorm2d: (),
    nn.LazyInstanceNorm3d: (),
}.items():
    CASES[_lazy] = (
        lambda c=_lazy, a=_args: c(*a, affine=True) if "Instance" in c.__name__ else c(*a),
        None,
        "lazy",
    )
if hasattr(nn, "LinearCrossEntropyLoss"):
    CASES[nn.LinearCrossEntropyLoss] = (
        lambda: nn.LinearCrossEntropyLoss(4, 5),
        lambda: (torch.randn(3, 4), torch.randint(0, 5, (3,))),
        "fused",
    )

# Kinds without parameters whose constructor needs arguments the probe below cannot guess.
NO_PARAMETERS = {"Unflatten"}


def _torch_nn_kinds() -> list[type[nn.Module]]:
    kinds = {
        obj
        for name in dir(nn)
        if isinstance(obj := getattr(nn, name), type) and issubclass(obj, nn.Module)
    }
    return sorted(kinds, key=lambda k: k.__name__)


def _has_parameters_or_unknown(kind: type[nn.Module]) -> bool:
    """Try a few constructor argument lists; a kind none of them builds is 'unknown'."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for args in ((), (4,), (4, 4), (4, 4, 3), (4, 4, 4, 4)):
            try:
                module = kind(*args)
            except Exception:
                continue
            return len(list(module.parameters())) > 0
    return kind.__name__ not in NO_PARAMETERS


def test_every_torch_nn_kind_with_parameters_is_classified():
    """A torch.nn module kind with parameters (or one the probe cannot build) must be listed in
    CASES; a new torch release adding one makes this fail until it is classified."""
    missing = [
        k.__name__ for k in _torch_nn_kinds() if _has_parameters_or_unknown(k) and k not in CASES
    ]
    assert missing == []


class Harness(nn.Module):
    """module -> a scalar per row -> Linear(1, 1) (so that the model always has a layer)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m = module
        self.probe = nn.Linear(1, 1)

    def forward(self, *inputs):
        y = self.m(*inputs)
        if isinstance(y, tuple):
            y = y[0]
        y = y.float()
        r = y.reshape(1, 1) if y.dim() == 0 else y.reshape(y.shape[0], -1).mean(1, keepdim=True)
        return self.probe(r)


@pytest.mark.parametrize("kind", list(CASES), ids=lambda k: k.__name__)
def test_module_kind_works_or_is_listed_with_reason(kind):
    torch.manual_seed(0)
    make, inputs, expected = CASES[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = make()
    model = Harness(module)
    pre = seed_preconditioner(model, other_params="diagonal")
    s = pre.summary()
    covered = {p for r in s.layers for p in r.parameters} | {d.name for d in s.diagonal}
    left = dict(s.unpreconditioned)
    names = {"m." + n for n, _ in module.named_parameters()}
    assert names, "the case must have parameters"
    assert covered.isdisjoint(left)
    assert names <= covered | set(left)
    if expected == COVERED:
        assert names <= covered, {n: left[n] for n in names - covered}
    else:
        assert all(expected in left[n] for n in names), {n: left.get(n) for n in names}
    if inputs is None:
        return
    model.zero_grad()
    model(*inputs()).square().sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. "no statistics yet"
        pre.step()
    for n, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
    if expected == COVERED:
        assert all(name in pre.factors() for name in {r.name for r in s.layers})


@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_checkpoint_round_trip_with_structured_factors_and_diagonal_parameters(mode):
    """Embeddings, attention, block-diagonal and diagonal factors, diagonal Fishers: resuming
    from a state_dict continues exactly as an uninterrupted run."""
    import io

    torch.manual_seed(0)
    opts = dict(
        other_params="diagonal",
        max_factor_dim=40,
        large_factor_block=16,
        damping=0.1,
        damping_mode=mode,
        inv_update_steps=2,
    )
    batches = [torch.randint(0, 97, (3, 9)) for _ in range(5)]
    init = GPT(vocab=97).state_dict()

    def run(model, pre, xs):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for x in xs:
            opt.zero_grad()
            lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
            pre.step()
            opt.step()

    straight = GPT(vocab=97)
    straight.load_state_dict(init)
    run(straight, seed_preconditioner(straight, **opts), batches)

    first = GPT(vocab=97)
    first.load_state_dict(init)
    pre = seed_preconditioner(first, **opts)
    run(first, pre, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "kfac": pre.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = GPT(vocab=97)
    resumed.load_state_dict(ckpt["model"])
    pre2 = seed_preconditioner(resumed, **opts)
    pre2.load_state_dict(ckpt["kfac"])
    run(resumed, pre2, batches[3:])
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
