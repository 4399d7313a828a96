"""The derived CIFAR network: parameter counts and outputs against a transcription of the original code, shapes, the
auxiliary head, drop path (statistics and where it applies), channels-last, every genotype trains, config errors."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnn_darts.network import AuxiliaryHead, DerivedCell, NetworkCIFAR, NetworkConfig, drop_path
from shared.errors import ConfigError
from shared.genotypes import CNN_PRIMITIVES, GENOTYPES, CNNGenotype, published

TINY = NetworkConfig(C=4, layers=5)
CNN_GENOTYPES = tuple(name for name in GENOTYPES.names() if name.startswith("cnn/"))
RANDOM_SEED = 1  # random_genotype(1): 5 nodes, normal cell concatenates 3 of them, reduction cell all 5


# --- A transcription of the original code (quark0/darts cnn/operations.py, cnn/model.py, cnn/utils.py), on CPU. ---
# Only forward passes on contiguous (NCHW) input run through it: its stride-2 1x1 convs are the ones whose
# channels-last backward torch 2.13 gets wrong.

class OrigReLUConvBN(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(inplace=False),
                                nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
                                nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class OrigDilConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class OrigSepConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, 1, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class OrigIdentity(nn.Module):
    def forward(self, x):
        return x


class OrigFactorizedReduce(nn.Module):
    def __init__(self, C_in, C_out, affine=True):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


ORIG_OPS = {
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: OrigIdentity() if stride == 1 else OrigFactorizedReduce(C, C, affine),
    "sep_conv_3x3": lambda C, stride, affine: OrigSepConv(C, C, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda C, stride, affine: OrigSepConv(C, C, 5, stride, 2, affine=affine),
    "dil_conv_3x3": lambda C, stride, affine: OrigDilConv(C, C, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda C, stride, affine: OrigDilConv(C, C, 5, stride, 4, 2, affine=affine),
}


def orig_drop_path(x, drop_prob):
    if drop_prob > 0.:
        keep_prob = 1. - drop_prob
        mask = torch.FloatTensor(x.size(0), 1, 1, 1).bernoulli_(keep_prob)  # torch.cuda.FloatTensor originally
        x.div_(keep_prob)
        x.mul_(mask)
    return x


class OrigCell(nn.Module):
    def __init__(self, genotype, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        if reduction_prev:
            self.preprocess0 = OrigFactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = OrigReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = OrigReLUConvBN(C_prev, C, 1, 1, 0)
        if reduction:
            op_names, indices = zip(*genotype.reduce)
            concat = genotype.reduce_concat
        else:
            op_names, indices = zip(*genotype.normal)
            concat = genotype.normal_concat
        self._steps = len(op_names) // 2
        self._concat = concat
        self.multiplier = len(concat)
        self._ops = nn.ModuleList()
        for name, index in zip(op_names, indices):
            stride = 2 if reduction and index < 2 else 1
            self._ops += [ORIG_OPS[name](C, stride, True)]
        self._indices = indices

    def forward(self, s0, s1, drop_prob):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self._steps):
            op1, op2 = self._ops[2 * i], self._ops[2 * i + 1]
            h1 = op1(states[self._indices[2 * i]])
            h2 = op2(states[self._indices[2 * i + 1]])
            if self.training and drop_prob > 0.:
                if not isinstance(op1, OrigIdentity):
                    h1 = orig_drop_path(h1, drop_prob)
                if not isinstance(op2, OrigIdentity):
                    h2 = orig_drop_path(h2, drop_prob)
            states += [h1 + h2]
        return torch.cat([states[i] for i in self._concat], dim=1)


class OrigAuxiliaryHeadCIFAR(nn.Module):
    def __init__(self, C, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True), nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class OrigNetworkCIFAR(nn.Module):
    def __init__(self, C, num_classes, layers, auxiliary, genotype):
        super().__init__()
        self._layers = layers
        self._auxiliary = auxiliary
        stem_multiplier = 3
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            if i in [layers // 3, 2 * layers // 3]:
                C_curr *= 2
                reduction = True
            else:
                reduction = False
            cell = OrigCell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells += [cell]
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == 2 * layers // 3:
                C_to_auxiliary = C_prev
        if auxiliary:
            self.auxiliary_head = OrigAuxiliaryHeadCIFAR(C_to_auxiliary, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self.drop_path_prob = 0.0

    def forward(self, input):
        logits_aux = None
        s0 = s1 = self.stem(input)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self._layers // 3:
                if self._auxiliary and self.training:
                    logits_aux = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        logits = self.classifier(out.view(out.size(0), -1))
        return logits, logits_aux


def orig_count_parameters(model):
    """utils.count_parameters_in_MB, in parameters rather than millions: the auxiliary head is not counted."""
    return sum(v.numel() for name, v in model.named_parameters() if "auxiliary" not in name)


# --- Helpers. ---

def build(config: NetworkConfig = TINY, genotype: CNNGenotype | str = "DARTS_V2", seed: int = 0) -> NetworkCIFAR:
    torch.manual_seed(seed)
    return NetworkCIFAR(config, published("cnn", genotype) if isinstance(genotype, str) else genotype)


def images(batch: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def transcription_of(model: NetworkCIFAR) -> OrigNetworkCIFAR:
    """The original network for the same config and genotype, holding `model`'s state: the two state dicts list the
    same tensors in the same order (only the names differ: `op.1` for `body.0`, `_ops` for `ops`)."""
    config = model.config
    orig = OrigNetworkCIFAR(config.C, config.num_classes, config.layers, config.auxiliary, model.genotype)
    ours, theirs = model.state_dict(), orig.state_dict()
    assert len(ours) == len(theirs)
    for (name, value), (orig_name, orig_value) in zip(ours.items(), theirs.items()):
        assert value.shape == orig_value.shape, (name, orig_name)
    orig.load_state_dict(dict(zip(theirs, ours.values())))
    return orig


def random_genotype(seed: int, steps: int = 5) -> CNNGenotype:
    """A random valid genotype: random ops and distinct inputs per node, and a random concat that holds at least every
    node no later node reads (so that every op reaches the output and gets a gradient)."""
    rng = random.Random(seed)
    cells = {}
    for cell in ("normal", "reduce"):
        edges = []
        for i in range(steps):
            edges += [(rng.choice(CNN_PRIMITIVES[1:]), j) for j in rng.sample(range(i + 2), 2)]
        read = {j for _, j in edges}
        concat = sorted({node for node in range(2, steps + 2) if node not in read or rng.random() < 0.5})
        cells[cell], cells[f"{cell}_concat"] = tuple(edges), tuple(concat)
    return CNNGenotype(**cells)


# --- Parameter counts and outputs against the transcription. ---

@pytest.mark.parametrize("name", ["DARTS_V1", "DARTS_V2"])
def test_parameter_counts_match_the_original_code(name: str) -> None:
    model = NetworkCIFAR(NetworkConfig(), published("cnn", name))
    orig = OrigNetworkCIFAR(36, 10, 20, True, published("cnn", name))
    assert model.num_parameters() == orig_count_parameters(orig)
    assert model.num_parameters(include_auxiliary=True) == sum(p.numel() for p in orig.parameters())
    # Auxiliary head on the 4 * 144 = 576 channels of cell 13: conv 576*128, BN 2*128, conv 128*768*2*2, BN 2*768,
    # linear 768*10 + 10.
    aux = 576 * 128 + 2 * 128 + 128 * 768 * 4 + 2 * 768 + 768 * 10 + 10
    assert model.num_parameters(include_auxiliary=True) - model.num_parameters() == aux
    if name == "DARTS_V2":
        # The paper's 3.3M (Table 1); exactly 3,349,342 in both implementations, the auxiliary head left out.
        assert abs(model.num_parameters() - 3.3e6) <= 0.02 * 3.3e6
        assert model.num_parameters() == 3_349_342


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("genotype", ["DARTS_V1", "DARTS_V2", "random"])
def test_eval_outputs_equal_the_original_code_given_the_same_state(genotype: str, channels_last: bool) -> None:
    cnn_genotype = random_genotype(RANDOM_SEED) if genotype == "random" else published("cnn", genotype)
    model = build(NetworkConfig(C=6, layers=5, channels_last=channels_last), cnn_genotype)
    # One training pass's BatchNorm statistics, so that eval mode does not normalise with the initial ones.
    with torch.no_grad():
        model.train()(images(seed=2))
    orig = transcription_of(model)
    model.eval(), orig.eval()
    x = images()
    with torch.no_grad():
        logits, aux = model(x)
        orig_logits, orig_aux = orig(x)
    assert aux is None and orig_aux is None
    torch.testing.assert_close(logits, orig_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("genotype", ["DARTS_V1", "DARTS_V2"])
def test_training_outputs_equal_the_original_code_with_the_same_drop_path_draws(genotype: str) -> None:
    """In training, drop path draws one mask per non-identity op, in the original's order, from the global RNG: from
    the same seed both networks drop the same paths, and both heads agree."""
    model = build(NetworkConfig(C=6, layers=5, channels_last=False), genotype)
    orig = transcription_of(model)
    model.drop_path_prob = orig.drop_path_prob = 0.3
    x = images()
    with torch.no_grad():
        torch.manual_seed(5)
        logits, aux = model(x)
        torch.manual_seed(5)
        orig_logits, orig_aux = orig(x)
        torch.manual_seed(6)
        other_logits, _ = model(x)
    torch.testing.assert_close(logits, orig_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux, orig_aux, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, other_logits, atol=1e-3)  # another seed drops other paths


# --- Shapes and the auxiliary head. ---

def test_output_shapes_and_the_auxiliary_head_only_in_training() -> None:
    model = build(NetworkConfig(C=4, layers=5, num_classes=7))
    logits, aux = model.train()(images())
    assert logits.shape == (4, 7) and aux is not None and aux.shape == (4, 7)
    logits, aux = model.eval()(images())
    assert logits.shape == (4, 7) and aux is None
    no_aux = build(NetworkConfig(C=4, layers=5, auxiliary=False))
    assert no_aux.auxiliary_head is None
    logits, aux = no_aux.train()(images())
    assert logits.shape == (4, 10) and aux is None
    assert no_aux.num_parameters() == no_aux.num_parameters(include_auxiliary=True)


def test_cells_reduce_at_a_third_and_two_thirds_and_the_head_reads_cell_two_thirds() -> None:
    model = build(NetworkConfig(C=4, layers=8))
    assert [cell.reduction for cell in model.cells] == [False, False, True, False, False, True, False, False]
    assert model.aux_position == 5
    assert model.auxiliary_head.features[2].in_channels == 4 * 16  # 4 concatenated nodes of 4 * C channels
    assert model.classifier.in_features == 4 * 16


def test_auxiliary_head_maps_8x8_features_to_logits_and_rejects_other_sizes() -> None:
    head = AuxiliaryHead(6, 10)
    assert head(torch.randn(2, 6, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="8 x 8 inputs"):
        head(torch.randn(2, 6, 16, 16))


# --- Drop path. ---

def test_eval_mode_is_deterministic_and_ignores_drop_path_prob() -> None:
    model = build().eval()
    with torch.no_grad():
        reference, _ = model(images())
        model.drop_path_prob = 0.5
        first, _ = model(images())
        second, _ = model(images())
    assert torch.equal(first, second) and torch.equal(first, reference)


@pytest.mark.parametrize("drop_prob", [0.2, 0.6])
def test_drop_path_scales_kept_samples_by_one_over_keep_prob_and_preserves_the_mean(drop_prob: float) -> None:
    n = 200_000
    x = torch.rand(n, 3, 2, 2) + 0.5  # positive, so that a zero output means a dropped sample
    torch.manual_seed(0)
    y = drop_path(x, drop_prob)
    kept = y[:, 0, 0, 0] != 0
    # Whole samples are kept or dropped, and kept ones are scaled by exactly 1 / (1 - p).
    torch.testing.assert_close(y[kept], x[kept] / (1 - drop_prob))
    assert torch.all(y[~kept] == 0)
    # The kept fraction is Binomial(n, 1-p)/n: std sqrt(p(1-p)/n) < 0.0011. 5 standard deviations is well below the
    # gap to any wrong keep probability (p itself is 0.2 or 0.6 away from 1 - p for these p).
    assert abs(kept.float().mean().item() - (1 - drop_prob)) < 5 * (drop_prob * (1 - drop_prob) / n) ** 0.5
    # The expected value is preserved: per sample y/x is 0 or 1/(1-p), mean 1, std sqrt(p/(1-p)/n) < 0.0028; without
    # the scaling the mean would be 1 - p <= 0.8.
    ratio = (y / x).mean(dim=(1, 2, 3))
    assert abs(ratio.mean().item() - 1.0) < 5 * (drop_prob / (1 - drop_prob) / n) ** 0.5


def test_drop_path_draws_from_the_global_rng_or_the_given_generator_and_keeps_the_layout() -> None:
    x = torch.randn(64, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    first = drop_path(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(drop_path(x, 0.5), first)
    assert torch.equal(drop_path(x, 0.5, torch.Generator().manual_seed(3)), first)
    assert first.is_contiguous(memory_format=torch.channels_last)
    assert drop_path(x, 0.0) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        drop_path(x, 1.0)


def test_drop_path_spares_identities_and_only_applies_in_training() -> None:
    genotype = published("cnn", "DARTS_V2")
    skips = CNNGenotype(normal=(("skip_connect", 0), ("skip_connect", 1)) * 2, normal_concat=(2, 3),
                        reduce=genotype.reduce, reduce_concat=genotype.reduce_concat)
    s0, s1 = torch.randn(8, 6, 8, 8), torch.randn(8, 6, 8, 8)
    for genotype, identities in ((skips, True), (genotype, False)):
        torch.manual_seed(0)
        cell = DerivedCell(genotype, 6, 6, 4, reduction=False, reduction_prev=False)
        assert any(cell.droppable) is not identities
        with torch.no_grad():
            plain = cell(s0, s1, 0.0)
            dropped = cell(s0, s1, 0.5)
            assert torch.equal(cell.eval()(s0, s1, 0.5), cell(s0, s1, 0.0))
        assert torch.equal(plain, dropped) is identities


def test_drop_path_prob_outside_zero_one_is_rejected() -> None:
    model = build()
    model.drop_path_prob = 0.2
    assert model.drop_path_prob == 0.2
    with pytest.raises(ConfigError, match="drop_path_prob"):
        model.drop_path_prob = 1.0


# --- Layout and training. ---

def test_channels_last_and_contiguous_give_the_same_outputs() -> None:
    contiguous = build(NetworkConfig(C=4, layers=5, channels_last=False))
    channels_last = build(NetworkConfig(C=4, layers=5, channels_last=True))
    channels_last.load_state_dict(contiguous.state_dict())
    for mode in ("train", "eval"):
        getattr(contiguous, mode)(), getattr(channels_last, mode)()
        with torch.no_grad():
            a_logits, a_aux = contiguous(images())
            b_logits, b_aux = channels_last(images())
        torch.testing.assert_close(a_logits, b_logits, atol=1e-5, rtol=1e-5)
        if mode == "train":
            torch.testing.assert_close(a_aux, b_aux, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("genotype", [*CNN_GENOTYPES, "random"])
def test_every_genotype_trains_with_finite_gradients_on_every_parameter(genotype: str) -> None:
    cnn_genotype = random_genotype(RANDOM_SEED) if genotype == "random" else GENOTYPES.get(genotype)
    model = build(NetworkConfig(C=4, layers=3), cnn_genotype).train()
    model.drop_path_prob = 0.2
    logits, aux = model(images(batch=3))
    target = torch.tensor([1, 7, 3])
    (F.cross_entropy(logits, target) + 0.4 * F.cross_entropy(aux, target)).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_random_genotype_with_uneven_concats_sizes_its_cells() -> None:
    genotype = random_genotype(RANDOM_SEED)
    assert len(genotype.normal_concat) != len(genotype.reduce_concat)  # the seed picks a genotype that tests this
    model = build(NetworkConfig(C=4, layers=4), genotype)
    # Nodes of 4, 8, 16, 16 channels (reductions at cells 1 and 2); normal cells concatenate 3 nodes, reductions 5.
    assert [cell.multiplier for cell in model.cells] == [3, 5, 5, 3]
    assert model.auxiliary_head.features[2].in_channels == 5 * 16  # the head reads cell 2, a reduction
    assert model.classifier.in_features == 3 * 16
    logits, aux = model(images(batch=2))
    assert logits.shape == aux.shape == (2, 10)


@pytest.mark.gpu
def test_on_cuda_drop_path_draws_on_the_device_and_the_network_trains() -> None:
    x = torch.ones(256, 2, 2, 2, device="cuda")
    torch.cuda.manual_seed(0)
    y = drop_path(x, 0.5)
    assert y.device == x.device and set(y.unique().tolist()) == {0.0, 2.0}
    model = build().to("cuda").train()
    model.drop_path_prob = 0.2
    logits, aux = model(images().to("cuda"))
    (logits.square().mean() + aux.square().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --- Configuration errors. ---

@pytest.mark.parametrize(("field", "value"), [
    ("C", 0), ("C", 3.5), ("layers", 1), ("num_classes", -1), ("stem_multiplier", 0), ("auxiliary", "yes"),
    ("channels_last", 1),
])
def test_bad_config_values_fail_with_one_line_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as error:
        NetworkConfig(**{field: value})
    message = str(error.value)
    assert message.startswith(field) and "\n" not in message


def test_a_recurrent_genotype_is_rejected() -> None:
    with pytest.raises(ConfigError, match="convolutional"):
        NetworkCIFAR(TINY, published("rnn", "DARTS_V2"))
