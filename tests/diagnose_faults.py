"""Seeded faults for ``diagnose``: three models of different shape (a CNN with batch norm,
a transformer encoder, a GRU model), exported to every target; then, for each layer with
weights, a copy of the bundle whose artifacts each have exactly that layer's weight tensor
scaled by 1.05 *inside the finished file* (the ONNX initializer, the TFLite buffer, the Core
ML weight blob, the ExecuTorch program's constant, the TorchScript parameter), the bundle
resealed (hashes recomputed, as an attacker or a corrupting disk would leave it) so that
only parity can notice. ``diagnose`` must name that layer first (or a span it is fused into).

Each target's corruptor lives in ``tests/faults_<target>.py`` as
``corrupt(artifact: Path, module: str, factor: float, bundle: Path, art: dict) -> None``
(``art`` is the artifact's contract entry); it raises ``LookupError`` when the artifact does
not hold that module's weights as a tensor it can find (a miss the note must list).
Imported by tests only (imports torch inside functions)."""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FACTOR = 1.05


def cnn_bn() -> tuple[Any, tuple[Any, ...], dict[str, Any], list[str]]:
    import torch
    from torch import nn

    torch.manual_seed(11)

    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
            self.bn2 = nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 5)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(image)))
            y = torch.relu(self.bn2(self.conv2(y)))
            return self.fc(y.mean(dim=(2, 3)))

    model = CNN()
    with torch.no_grad():  # real running statistics, as after training
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    model.eval()
    example = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(11)),)
    options = {"input_names": ["image"], "output_names": ["logits"], "input_ranges": {"image": (0.0, 1.0)}}
    return model, example, options, ["conv1", "bn1", "conv2", "bn2", "fc"]


def encoder() -> tuple[Any, tuple[Any, ...], dict[str, Any], list[str]]:
    import torch
    from torch import nn

    torch.manual_seed(12)

    class Block(nn.Module):
        def __init__(self, dim: int = 16, heads: int = 2) -> None:
            super().__init__()
            self.heads = heads
            self.norm1 = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, 2 * dim)
            self.fc2 = nn.Linear(2 * dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 16)
            self.block = Block()
            self.head = nn.Linear(16, 3)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.head(self.block(self.embed(features)).mean(dim=1))

    model = Encoder().eval()
    with torch.no_grad():  # trained-looking norms (all-ones weights would be one shared constant)
        for norm in (model.block.norm1, model.block.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
    example = (torch.randn(1, 8, 6, generator=torch.Generator().manual_seed(12)),)
    options = {"input_names": ["features"], "output_names": ["scores"]}
    return model, example, options, ["embed", "block.norm1", "block.qkv", "block.proj", "block.norm2",
                                     "block.fc1", "block.fc2", "head"]


def gru() -> tuple[Any, tuple[Any, ...], dict[str, Any], list[str]]:
    import torch
    from torch import nn

    torch.manual_seed(13)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(5, 12)
            self.rnn = nn.GRU(12, 12, batch_first=True)
            self.out = nn.Linear(12, 4)

        def forward(self, seq: torch.Tensor) -> torch.Tensor:
            h, _ = self.rnn(torch.tanh(self.inp(seq)))
            return self.out(h[:, -1])

    model = Tagger().eval()
    example = (torch.randn(1, 6, 5, generator=torch.Generator().manual_seed(13)),)
    options = {"input_names": ["seq"], "output_names": ["tags"]}
    return model, example, options, ["inp", "rnn", "out"]


MODELS = {"cnn_bn": cnn_bn, "encoder": encoder, "gru": gru}


def export_base(name: str, out: Path, targets: Iterable[str], **extra: Any) -> Any:
    """The fault-free bundle of model ``name`` at ``out``."""
    import portable_models as pm

    model, example, options, _ = MODELS[name]()
    return pm.export(model, example, out=out, targets=list(targets), **options, **extra)


def reseal(bundle: Path) -> None:
    """Recompute every artifact's hash and size and the file list, as a tool that edits a
    bundle on purpose would: only parity can tell that something changed."""
    from portable_models.contract.bundle import list_files, sha256_path

    contract = json.loads((bundle / "contract.json").read_text())
    for art in contract["artifacts"]:
        if art.get("file"):
            path = bundle / art["file"]
            art["sha256"], art["bytes"] = sha256_path(path), path.stat().st_size
    contract["files"] = list_files(bundle)
    (bundle / "contract.json").write_text(json.dumps(contract))


def corruptor(target: str) -> Any:
    return importlib.import_module(f"faults_{target}").corrupt


@dataclass
class Outcome:
    model: str
    target: str
    layer: str
    named: str | None = None
    span: list[str] = field(default_factory=list)
    why: str | None = None  # a miss's reason

    @property
    def seeded(self) -> bool:
        """The fault could be put in the artifact (a weight folded into another op's, e.g. a
        batch norm's into its convolution, has no tensor of its own to scale)."""
        return not (self.why or "").startswith("not corrupted")

    @property
    def hit(self) -> bool:
        return self.why is None and self.layer in (self.span or [self.named])

    @property
    def exact(self) -> bool:
        """Named on its own, not inside a span of several modules."""
        return self.hit and self.named == self.layer and len(self.span) <= 1


def seed_and_diagnose(base: Path, model: str, layer: str, targets: Iterable[str], dest: Path) -> list[Outcome]:
    """Copy ``base`` to ``dest``, scale ``layer``'s weights by :data:`FACTOR` in the artifact
    of each of ``targets``, reseal, diagnose, and say per target what was named."""
    import portable_models as pm

    shutil.copytree(base, dest)
    contract = json.loads((dest / "contract.json").read_text())
    outcomes: dict[str, Outcome] = {}
    for art in contract["artifacts"]:
        if art["target"] not in targets or not art.get("file") or art["status"] != "pass":
            continue
        outcome = outcomes[art["target"]] = Outcome(model, art["target"], layer)
        try:
            corruptor(art["target"])(dest / art["file"], layer, FACTOR, dest, art)
        except LookupError as exc:
            outcome.why = f"not corrupted: {exc}"
    reseal(dest)
    chosen = [t for t, o in outcomes.items() if o.why is None]
    if chosen:
        report = pm.diagnose(dest, targets=chosen)
        for res in report.results:
            outcome = outcomes[res["target"]]
            first = res.get("first")
            if res.get("error"):
                outcome.why = f"not localised: {res['error']}"
            elif first is None:
                outcome.why = "no divergence found"
            else:
                outcome.named, outcome.span = first["module"], list(first.get("span") or [])
                if not outcome.hit:
                    outcome.why = f"named {first['module']} (span {first.get('span')})"
    return list(outcomes.values())


def hit_rate(outcomes: list[Outcome]) -> float:
    """Hits among the faults that could be seeded."""
    seeded = [o for o in outcomes if o.seeded]
    return sum(o.hit for o in seeded) / len(seeded) if seeded else 0.0


def tally(outcomes: list[Outcome]) -> str:
    """Per target: hits among the seeded faults (and how many of them named the module on its
    own rather than inside a span), the faults that could not be seeded; every miss and every
    span, with its reason."""
    lines = []
    for target in sorted({o.target for o in outcomes}):
        mine = [o for o in outcomes if o.target == target]
        seeded = [o for o in mine if o.seeded]
        lines.append(f"{target}: {sum(o.hit for o in seeded)}/{len(seeded)} named first "
                     f"({sum(o.exact for o in seeded)} on their own), {len(mine) - len(seeded)} not seedable")
    lines += [f"  miss {o.model}/{o.target}/{o.layer}: {o.why}" for o in outcomes if not o.hit]
    lines += [f"  span {o.model}/{o.target}/{o.layer}: {o.named} with {o.span}" for o in outcomes
              if o.hit and not o.exact]
    return "\n".join(lines)
