"""Learngenes: a ViT whose blocks are fixed combinations of a few shared components.

Lin et al. (NeurIPS 2024) write every parameter of block `l` (attention, MLP and LayerNorms) as
`W_l = sum_n a(l, n) A_n` over `K` learngenes `A_n` with fixed coefficients; TLEG (Xia et al., AAAI
2024) is the two-gene case `W_l = W_base + (l / L) W_ilayer`. Trained once, the genes build a ViT of
any depth `L'` from its first `k` genes ([`recompose_blocks`][frozenlm.models.learngene.recompose_blocks], `frozenlm recompose`). The patch
embedding, tokens, positions, final norm and head stay ordinary shared parameters.

The coefficients are functions of `x = l / L` for the block index `l = 0 .. L-1` of a depth-`L` ViT
([`coefficients`][frozenlm.models.learngene.coefficients]):

* `chebyshev` (the paper's default): `T_n(x)`, first kind, `T_0 = 1`, `T_1 = x`,
  `T_{n+1} = 2 x T_n - T_{n-1}`. The paper writes `T_n((l - 1) / L)` with blocks counted from 1 and
  genes from 1; read literally, gene 1 gets `T_1`, which is 0 for the first block, so a one-gene ViT
  would have an all-zero first block. Genes are indexed from `T_0` here: gene 0 is shared by every
  block with coefficient 1, and two genes are TLEG's form.
* `taylor`: `x^n`; `legendre`: `P_n(x)`; `fourier`: `1, sin 2 pi x, cos 2 pi x, sin 4 pi x, ...`
* `linear`: TLEG, `1` and `l / L` (two genes).

Gene 0 starts as timm's initialisation of block 0. The other genes start at zero (`init: zeros`,
frozenlm's), so every block starts equal and a gene added in a later phase of incremental training leaves
the model's function unchanged until it trains; or as TLEG's code starts its slope `W_ilayer`
(`init: tleg`): the linear layers' weights truncated normal with std 0.02 like the base's, their biases
and the LayerNorms' slopes zero (AlphaXia/TLEG `modules_with_LE.py`, `LELinear` / `LELayerNorm`
`reset_parameters`). `frozen_genes` keeps the first genes fixed (incremental training's earlier
phases): they get no gradient and stay bit-identical.

A gene whose coefficient is zero at every block of the model's depth would never train (Fourier's
`sin 2 pi k x` when `2k` is a multiple of the depth, e.g. gene 11 of 12 at depth 12; any gene past
the first at depth 1): such a model is refused ([`Learngenes`][frozenlm.models.learngene.Learngenes]).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

Basis = Literal["chebyshev", "taylor", "legendre", "fourier", "linear"]
BASES = ("chebyshev", "taylor", "legendre", "fourier", "linear")
DEFAULT_BASIS = "chebyshev"  # when neither the setting nor the weights started from name one
Init = Literal["zeros", "tleg"]


@dataclasses.dataclass
class LearngeneConfig:
    """A decomposed ViT (`--model.learngene '{genes: 12, basis: chebyshev}'`).

    Args:
        genes: number of learngenes `K` (`linear`: 2).
        basis: the coefficient functions (see [`learngene`][frozenlm.models.learngene]); None: the basis of the
            learngenes in `--model.init_from`, or `chebyshev` without such a file.
        frozen_genes: the first this many genes get no gradient (incremental training: the genes of
            earlier phases).
        init: the genes after the first: `zeros` (frozenlm's) or `tleg` (TLEG's: linear weights
            truncated normal, std 0.02). Genes loaded from `--model.init_from` replace either.
    """

    genes: int
    basis: Basis | None = None
    frozen_genes: int = 0
    init: Init = "zeros"

    def __post_init__(self) -> None:
        if self.init not in ("zeros", "tleg"):
            raise ValueError(f"learngene.init must be zeros or tleg, got {self.init!r}.")
        if self.basis is not None and self.basis not in BASES:
            raise ValueError(f"learngene.basis must be one of {', '.join(BASES)}, got {self.basis!r}.")
        if self.genes < 1 or (self.basis == "linear" and self.genes != 2):
            raise ValueError(f"learngene.genes must be at least 1 (2 for the linear basis), got {self.genes}.")
        if not 0 <= self.frozen_genes < self.genes:
            raise ValueError(f"learngene.frozen_genes must be in [0, {self.genes}), got {self.frozen_genes}.")


def coefficients(basis: Basis, depth: int, genes: int) -> torch.Tensor:
    """`a(l, n)` as a `[depth, genes]` float64 tensor, for blocks `l` and genes `n`."""
    if basis not in BASES:
        raise ValueError(f"basis must be one of {', '.join(BASES)}, got {basis!r}.")
    x = torch.arange(depth, dtype=torch.float64) / depth
    columns = [torch.ones_like(x)]
    for n in range(1, genes):
        if basis in ("taylor", "linear"):
            columns.append(x**n)
        elif basis == "chebyshev":
            columns.append(x if n == 1 else 2 * x * columns[-1] - columns[-2])
        elif basis == "legendre":  # Bonnet: n P_n = (2n - 1) x P_{n-1} - (n - 1) P_{n-2}
            columns.append(x if n == 1 else ((2 * n - 1) * x * columns[-1] - (n - 1) * columns[-2]) / n)
        else:  # fourier
            frequency = 2 * math.pi * ((n + 1) // 2)
            columns.append(torch.sin(frequency * x) if n % 2 else torch.cos(frequency * x))
    return torch.stack(columns, dim=1)


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


class Learngenes(nn.Module):
    """The genes of a stack of identical blocks (a timm ViT's `blocks`), giving each block's parameters.

    The blocks' own parameters are removed (they hold None); the model that owns the blocks runs block `l`
    with `torch.func.functional_call(block, learngenes.compose(l), x)`, where [`compose`][frozenlm.models.learngene.Learngenes.compose] gives each of
    its parameters as `sum_n a(l, n) A_n` (a tensor, differentiable in the genes), so nothing stays on the
    block after the call. State: `genes.<n>.<name>`.
    """

    def __init__(self, blocks: nn.ModuleList, config: LearngeneConfig) -> None:
        super().__init__()
        self.names = [name for name, _ in blocks[0].named_parameters()]
        for index, block in enumerate(blocks):
            shapes = [(name, p.shape) for name, p in block.named_parameters()]
            if shapes != [(name, p.shape) for name, p in blocks[0].named_parameters()]:
                raise ValueError(f"Learngenes need identical blocks; block {index} differs from block 0.")
        self.depth = len(blocks)
        self.use_basis(config.basis or DEFAULT_BASIS, config.genes)
        first = dict(blocks[0].named_parameters())
        self.genes = nn.ModuleList(
            nn.ParameterDict({_key(name): nn.Parameter(_initial(blocks[0], name, first[name], n, config.init)) for name in self.names})
            for n in range(config.genes)
        )  # fmt: skip
        for gene in self.genes[: config.frozen_genes]:
            gene.requires_grad_(False)
        for block in blocks:
            for name in self.names:
                owner, attribute = _owner(block, name)
                del owner._parameters[attribute]
                setattr(owner, attribute, None)

    def use_basis(self, basis: Basis, genes: int | None = None) -> None:
        """Compose the blocks with `basis`'s coefficients (the basis of weights loaded into the model).

        Raises `ValueError` when a gene's coefficient is zero at every block: that gene would never train."""
        genes = len(self.genes) if genes is None else genes
        weights = coefficients(basis, self.depth, genes)
        unused = [n for n in range(genes) if weights[:, n].abs().max() < 1e-9]
        if unused:
            raise ValueError(
                f"learngene: gene {unused[0]} of the {basis} basis is zero at every block of this {self.depth}-block "
                f"ViT, so it would never train; use at most {unused[0]} genes (learngene.genes), another depth or another basis."
            )
        self.register_buffer("coefficients", weights.float(), persistent=False)

    def compose(self, index: int) -> dict[str, torch.Tensor]:
        """Block `index`'s parameters, `{name: sum_n a(index, n) A_n}`, to run it with
        `torch.func.functional_call(block, learngenes.compose(index), x)`."""
        return self.block_parameters(self.coefficients[index])

    def block_parameters(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """One block's parameters, `{name: sum_n weights[n] A_n}`."""
        return {name: combine(weights, [gene[_key(name)] for gene in self.genes]) for name in self.names}

    def per_block_parameters(self) -> int:
        """Parameters of one block (= of one gene)."""
        return sum(p.numel() for p in self.genes[0].values())


def _initial(block: nn.Module, name: str, value: torch.Tensor, gene: int, init: str) -> torch.Tensor:
    """Gene `gene`'s starting value of parameter `name` (`value`: block 0's initialisation)."""
    if gene == 0:
        return value.detach().clone()
    owner, attribute = _owner(block, name)
    if init == "tleg" and isinstance(owner, nn.Linear) and attribute == "weight":  # TLEG's LELinear.weight_ilayer
        return nn.init.trunc_normal_(torch.empty_like(value), std=0.02)
    return torch.zeros_like(value)


def stored_learngene(stored: dict) -> tuple[str | None, int | None]:
    """`(basis, genes)` of the learngenes in weights read by `frozenlm.checkpoints.read_weights`: a
    checkpoint's hyper-parameters (`learngene`) or a `recompose --tied` file's metadata
    (`learngene_basis`, `learngene_genes`); None where the file does not say."""
    learngene = stored.get("learngene")
    if isinstance(learngene, dict):
        return learngene.get("basis"), learngene.get("genes")
    genes = stored.get("learngene_genes")
    return stored.get("learngene_basis"), (int(genes) if genes else None)


def combine(weights: torch.Tensor, genes: list[torch.Tensor]) -> torch.Tensor:
    """`sum_n weights[n] genes[n]` over the first `len(genes)` weights, in one fixed order (so a
    recomposed block equals the trained one bit for bit)."""
    return sum(weight * gene for weight, gene in zip(weights, genes))


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attribute = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attribute


def recompose_blocks(genes: list[dict[str, torch.Tensor]], basis: Basis, depth: int) -> dict[str, torch.Tensor]:
    """A plain ViT's block parameters `blocks.<l>.<name>` for `depth` blocks from `genes` (the first
    `k` genes, each `{parameter name: tensor}`), with the depth-`depth` coefficients."""
    weights = coefficients(basis, depth, len(genes)).float()
    return {
        f"blocks.{layer}.{name}": combine(weights[layer], [gene[name] for gene in genes])
        for layer in range(depth) for name in genes[0]
    }  # fmt: skip


def genes_in(state: dict[str, torch.Tensor], prefix: str = "learngenes.genes.") -> list[dict[str, torch.Tensor]]:
    """The genes of a decomposed model's state dict, as `[{parameter name: tensor}]` by gene index."""
    genes: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, name = key[len(prefix) :].split(".", 1)
            genes.setdefault(int(index), {})[name.replace("__", ".")] = value  # see _key
    return [genes[n] for n in sorted(genes)]


def gene_state(genes: list[dict[str, torch.Tensor]], prefix: str = "learngenes.genes.") -> dict[str, torch.Tensor]:
    """The state-dict entries of `genes` (the inverse of [`genes_in`][frozenlm.models.learngene.genes_in])."""
    return {f"{prefix}{n}.{_key(name)}": value for n, gene in enumerate(genes) for name, value in gene.items()}


# -- starting a model from weights that hold genes (`--model.init_from`) -------------------------------
def learngene_for(
    learngene: LearngeneConfig | dict, state: dict[str, torch.Tensor], stored: dict, source: str | None,
    init_genes: int | None,
) -> LearngeneConfig:
    """The decomposed model's configuration, its basis taken from the learngenes of `source`
    (`--model.init_from`, read as `state` and `stored`) when unset; a basis or a gene count that differs
    from the file's is refused."""
    from frozenlm.checkpoints import InitialWeightsError

    config = learngene if isinstance(learngene, LearngeneConfig) else LearngeneConfig(**learngene)
    held = len(genes_in(state))
    if not held:  # no file, or weights without genes (a plain ViT's: refused when loaded)
        return config if config.basis else dataclasses.replace(config, basis=DEFAULT_BASIS)
    basis, genes = stored_learngene(stored)
    if genes is not None and genes != held:
        raise InitialWeightsError(f"--model.init_from {source} says it holds {genes} learngenes but holds {held}: "
                                  "the file is damaged or edited; write it again.")  # fmt: skip
    if basis is None and config.basis is None:
        raise InitialWeightsError(f"--model.init_from {source} does not say the basis of its {held} learngenes: set "
                                  "--model.learngene.basis to the one they were trained with.")  # fmt: skip
    if basis is not None and config.basis not in (None, basis):
        raise InitialWeightsError(
            f"--model.init_from {source} holds {held} learngenes of the {basis} basis, but --model.learngene.basis is "
            f"{config.basis}: leave the basis unset (it follows the file) or set it to {basis}."
        )
    used = held if init_genes is None else init_genes
    if 1 <= used <= held and used > config.genes:  # (a used count outside [1, held] is refused when loading)
        raise InitialWeightsError(
            f"--model.init_from {source} holds {held} learngenes ({basis or config.basis} basis) and {used} are used, "
            f"but --model.learngene.genes is {config.genes}: set it to at least {used}, or --model.init_genes {config.genes}."
        )
    return dataclasses.replace(config, basis=config.basis or basis)


def from_genes(
    state: dict[str, torch.Tensor], stored: dict, count: int | None, source: str, decomposed: bool, depth: int
) -> dict[str, torch.Tensor]:
    """`state` (a model's names: `backbone.*`, `learngenes.genes.*`) with a decomposed model's genes turned
    into what a model takes: its first `count` genes when the model is `decomposed`, else recomposed into the
    `depth` blocks of a plain ViT (`backbone.blocks.*`), as `frozenlm recompose` would."""
    from frozenlm.checkpoints import InitialWeightsError

    genes = genes_in(state)
    if not genes:
        return state
    count = len(genes) if count is None else count
    if not 1 <= count <= len(genes):
        raise InitialWeightsError(f"--model.init_genes must be in [1, {len(genes)}] for {source}, got {count}.")
    kept = {k: v for k, v in state.items() if not k.startswith("learngenes.")}
    if decomposed:
        return kept | gene_state(genes[:count])
    basis, _ = stored_learngene(stored)
    if basis is None:
        raise InitialWeightsError(f"--model.init_from {source} holds learngenes but does not say their basis "
                                  "(learngene_basis): write it with `frozenlm recompose --tied true`.")  # fmt: skip
    blocks = recompose_blocks(genes[:count], basis, depth)
    return kept | {f"backbone.{key}": value for key, value in blocks.items()}
