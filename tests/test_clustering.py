"""Weight clustering: k-means math, ≤ k values per tensor/row, sparsity preservation, exact compact storage,
cluster-preserving fine-tuning and bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import hf_optim
from hf_optim.compression.algorithms.kmeans import INITS, assign, gptq_assign, init_centroids, kmeans_1d
from hf_optim.compression.clustering import CODEC, finalize_clusters, make_cluster_trainable
from hf_optim.compression.storage import PACKED_ATTR, PACKED_FILE, unpack_bits
from hf_optim.compression.targets import linear_weight, target_linears
from hf_optim.core.errors import ConfigError
from hf_optim.training.data import builtin_corpus
from tests.helpers import local_tokenizer, tiny_model

CALIB = {"num_calibration_samples": 8, "calibration_seq_len": 64}


def clustered_layers(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if getattr(m, PACKED_ATTR, None) is not None}


def distinct_values(weight: torch.Tensor, per_row: bool) -> int:
    return max(len(row.unique()) for row in weight) if per_row else len(weight.unique())


def mse(values: torch.Tensor, centroids: torch.Tensor) -> float:
    return float((values - centroids.gather(1, assign(values, centroids))).square().mean())


# --- the pure k-means functions -----------------------------------------------------------------------------------


def test_assign_is_the_nearest_centroid():
    values = torch.randn(3, 500, generator=torch.Generator().manual_seed(0))
    centroids = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)).sort(1).values
    brute = (values.unsqueeze(2) - centroids.unsqueeze(1)).abs().argmin(2)
    assert torch.equal(assign(values, centroids), brute)


@pytest.mark.parametrize("init", INITS)
def test_lloyd_lowers_the_error_of_every_init_and_is_seeded(init):
    values = torch.distributions.Laplace(0.0, 1.0).sample((4, 2000))
    start = init_centroids(values, 16, init, seed=3)
    centroids = kmeans_1d(values, 16, init, seed=3)
    assert centroids.shape == (4, 16) and torch.all(centroids.diff(dim=1) >= 0)
    assert mse(values, centroids) < mse(values, start)
    assert torch.equal(centroids, kmeans_1d(values, 16, init, seed=3))  # deterministic given the seed


def test_kmeans_beats_linear_init_and_seeds_differ():
    values = torch.distributions.Laplace(0.0, 1.0).sample((1, 5000))
    linear = init_centroids(values, 16, "linear")
    for init in INITS:
        assert mse(values, kmeans_1d(values, 16, init)) < 0.8 * mse(values, linear), init
    assert not torch.equal(init_centroids(values, 16, "random", seed=0), init_centroids(values, 16, "random", seed=1))
    assert not torch.equal(init_centroids(values, 16, "kmeans++", seed=0), init_centroids(values, 16, "kmeans++", seed=1))


def test_weighted_kmeans_follows_the_weights():
    values = torch.tensor([[0.0, 1.0, 10.0, 11.0]])
    heavy_right = torch.tensor([[1.0, 1.0, 1.0, 100.0]])
    assert kmeans_1d(values, 2, "linear")[0].tolist() == [0.5, 10.5]
    assert kmeans_1d(values, 2, "linear", weights=heavy_right)[0, 1] > 10.9


def test_gptq_assignment_lowers_the_output_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=gen) @ torch.randn(32, 32, generator=gen)  # correlated inputs
    w = torch.randn(16, 32, generator=gen)
    centroids = kmeans_1d(w.reshape(1, -1), 8)
    nearest = centroids[0][assign(w.reshape(1, -1), centroids).reshape(w.shape)]
    idx = gptq_assign(w, x.t().double() @ x.double(), centroids)
    compensated = centroids[0][idx]

    def output_error(q: torch.Tensor) -> float:
        return float(((w - q) @ x.t()).square().sum())

    assert output_error(compensated) < 0.8 * output_error(nearest)


# --- clustering models ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("mode", ["tensor", "channel", "row_scale"])
def test_every_init_gives_at_most_k_values(init, mode):
    model = tiny_model("llama")
    config = hf_optim.ClusterConfig(n_clusters=8, init=init, per_channel=mode == "channel", row_scale=mode == "row_scale")
    hf_optim.cluster(model, config)
    layers = clustered_layers(model)
    assert set(layers) == {name for name, _ in target_linears(model, exclude=["lm_head", "*embed*"])}
    for name, module in layers.items():
        values = distinct_values(linear_weight(module), per_row=mode != "tensor")
        assert 4 <= values <= 8, name
    assert model.lm_head.weight.unique().numel() > 1000  # excluded by default


def test_sparsity_preserving_keeps_zeros_exactly():
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _name, module in target_linears(model, exclude=["lm_head"]):
            module.weight.mul_(torch.rand(module.weight.shape, generator=generator) > 0.5)  # 50% exact zeros
    zeros = {name: linear_weight(m) == 0 for name, m in target_linears(model, exclude=["lm_head"])}
    hf_optim.cluster(model, hf_optim.ClusterConfig(n_clusters=8, per_channel=True, preserve_sparsity=True))
    for name, module in clustered_layers(model).items():
        weight = linear_weight(module)
        assert torch.equal(weight == 0, zeros[name]), name  # zeros stay zero, non-zeros stay non-zero
        assert distinct_values(weight, per_row=True) <= 8
    plain = tiny_model("llama")
    with torch.no_grad():
        plain.model.layers[0].mlp.up_proj.weight[:, :32] = 0
    hf_optim.cluster(plain, hf_optim.ClusterConfig(n_clusters=8, per_channel=True))
    assert int((plain.model.layers[0].mlp.up_proj.weight[:, :32] == 0).sum()) < 64  # without it, zeros move


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "options",
    [{"per_channel": False}, {"per_channel": True, "init": "density"}, {"per_channel": False, "row_scale": True},
     {"per_channel": False, "preserve_sparsity": True, "n_clusters": 256}],
)
def test_reload_is_bitwise_equal(tmp_path, family, options):
    model = tiny_model(family)
    hf_optim.cluster(model, hf_optim.ClusterConfig(**{"n_clusters": 16, **options}))
    hf_optim.save_optimized(model, tmp_path / "clustered")
    reloaded = hf_optim.load_optimized(tmp_path / "clustered")
    expected = model.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    ids = torch.randint(2, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # (the reload picks its own attention kernel, hence close rather than equal)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


@pytest.mark.parametrize(("options", "limit"), [({"per_channel": False}, 0.13), ({"per_channel": False, "row_scale": True}, 0.14)])
def test_sixteen_clusters_shrink_the_layers_on_disk(tmp_path, options, limit):
    model = tiny_model("llama")
    hf_optim.cluster(model, hf_optim.ClusterConfig(n_clusters=16, **options))
    hf_optim.save_optimized(model, tmp_path)
    with safe_open(tmp_path / PACKED_FILE, framework="pt") as packed, safe_open(tmp_path / "model.safetensors", "pt") as dense:
        assert not any(key.startswith(tuple(clustered_layers(model))) for key in dense.keys())
        for name, module in clustered_layers(model).items():
            parts = [packed.get_tensor(key) for key in packed.keys() if key.startswith(f"{name}.weight.")]
            stored = sum(t.numel() * t.element_size() for t in parts)
            assert stored <= limit * 4 * module.weight.numel(), name


@pytest.mark.parametrize("options", [{"weighting": "activation"}, {"compensation": "gptq", "row_scale": True}])
def test_calibrated_clustering(options):
    model = tiny_model("llama")
    config = hf_optim.ClusterConfig(n_clusters=8, per_channel=False, **options)
    with pytest.raises(ConfigError, match="calibration"):
        hf_optim.cluster(model, config)
    hf_optim.cluster(model, config, tokenizer=local_tokenizer(), calibration_texts=builtin_corpus()[:10], **CALIB)
    for module in clustered_layers(model).values():
        assert distinct_values(linear_weight(module), per_row=config.row_scale) <= 8


# --- cluster-preserving fine-tuning ----------------------------------------------------------------------------------


def assignments(model) -> dict[str, torch.Tensor]:
    result = {}
    for name, module in clustered_layers(model).items():
        packed = getattr(module, PACKED_ATTR)
        out, cols = packed.meta["shape"]
        result[name] = unpack_bits(packed.tensors["indices"], packed.meta["bits"], out * cols)
    return result


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("options", [{"per_channel": False}, {"per_channel": True, "preserve_sparsity": True},
                                     {"per_channel": False, "row_scale": True}])
def test_cluster_preserving_finetune(tmp_path, family, options):
    model, teacher = tiny_model(family), tiny_model(family)
    with torch.no_grad():  # some exact zeros, to check the zero cluster stays pinned
        for _name, module in target_linears(model, exclude=["lm_head"]):
            module.weight[..., :4] = 0
    ids = torch.randint(2, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = teacher(input_ids=ids).logits
    hf_optim.cluster(model, hf_optim.ClusterConfig(n_clusters=8, **options))
    before_idx = assignments(model)
    before_weights = {name: linear_weight(m).detach().clone() for name, m in clustered_layers(model).items()}
    params = make_cluster_trainable(model)
    assert len(params) == len(before_idx) * (2 if options.get("row_scale") else 1)  # codebooks (+ row scales)
    optimizer = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(15):  # recover the unclustered model's outputs by training the centroids only
        loss = torch.nn.functional.mse_loss(model(input_ids=ids).logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # eight shared values per tensor leave little to tune; a codebook per row (or a row scale) recovers much more
    assert losses[-1] < (0.98 if options == {"per_channel": False} else 0.6) * losses[0]
    assert sorted(finalize_clusters(model)) == sorted(before_idx)
    assert assignments(model).keys() == before_idx.keys()
    for name, idx in assignments(model).items():
        assert torch.equal(idx, before_idx[name]), name  # no weight changed cluster
        weight = linear_weight(dict(model.named_modules())[name])
        assert not torch.equal(weight, before_weights[name])  # but the centroids moved
        assert distinct_values(weight, per_row=options["per_channel"] or options.get("row_scale", False)) <= 8
        if options.get("preserve_sparsity"):
            assert torch.equal(weight == 0, before_weights[name] == 0)
    hf_optim.save_optimized(model, tmp_path)
    reloaded = hf_optim.load_optimized(tmp_path)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_trainable_clusters_reject_dense_assignment_and_unclustered_models():
    with pytest.raises(ConfigError, match="no clustered layers"):
        make_cluster_trainable(tiny_model("llama"))
    model = tiny_model("llama")
    hf_optim.cluster(model, hf_optim.ClusterConfig(n_clusters=4, per_channel=False))
    make_cluster_trainable(model)
    with pytest.raises(ConfigError, match="finalize_clusters"):
        model.model.layers[0].mlp.up_proj.weight = torch.zeros(128, 64)


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [({"n_clusters": 128, "per_channel": True}, r"n_clusters=128.*each row of 'model\.layers\.0\.self_attn\.q_proj' has 64"),
     ({"n_clusters": 3000, "per_channel": False}, r"n_clusters=3000.*'model\.layers\.0\.self_attn\.k_proj' has 2048")],
)
def test_too_many_clusters_fail_before_any_weight_changes(options, match):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        hf_optim.cluster(model, hf_optim.ClusterConfig(**options))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not clustered_layers(model)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"n_clusters": 1}, "n_clusters=1"), ({"init": "kmeans"}, "init='kmeans'"), ({"weighting": "hessian"}, "weighting="),
     ({"compensation": "obs"}, "compensation="), ({"row_scale": True}, "per_channel=False")],
)
def test_bad_config_values(options, match):
    with pytest.raises(ConfigError, match=match):
        hf_optim.ClusterConfig(**options)


def test_codec_name_and_recipe_round_trip():
    from hf_optim.compression.configs import config_from_dict

    config = hf_optim.ClusterConfig(n_clusters=16, per_channel=False, row_scale=True, compensation="gptq")
    assert config_from_dict(config.to_dict()) == config and config.needs_calibration
    assert CODEC == "kmeans"


# --- real model ----------------------------------------------------------------------------------------------------


def test_stories260k_sixteen_clusters_quality_and_size(stories260k_dir, shared_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_optim.compression.calibration import load_calibration_texts
    from hf_optim.core.evaluation import evaluate_perplexity

    tokenizer = AutoTokenizer.from_pretrained(stories260k_dir)
    text = (shared_dir / "corpora" / "tinystories" / "niklas6_tinystories.txt").read_text()
    calibration = load_calibration_texts(shared_dir / "corpora" / "tinystories" / "cs336_tinystories_sample.txt")
    model = AutoModelForCausalLM.from_pretrained(stories260k_dir)

    def perplexity() -> float:
        return evaluate_perplexity(model, tokenizer, [text], max_length=256, stride=128, max_tokens=12000)

    base = perplexity()
    config = hf_optim.ClusterConfig(n_clusters=16, init="density", per_channel=False, row_scale=True, compensation="gptq")
    hf_optim.cluster(model, config, tokenizer=tokenizer, calibration_texts=calibration)
    assert perplexity() <= 1.10 * base  # measured +6.8% on the whole text
    stored = sum(t.numel() * t.element_size() for m in clustered_layers(model).values()
                 for t in getattr(m, PACKED_ATTR).tensors.values())
    assert stored <= 0.16 * sum(4 * m.weight.numel() for m in clustered_layers(model).values())
