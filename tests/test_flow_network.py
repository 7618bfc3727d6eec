"""The flow network F_phi(x_t, t, c) of DAG: shape, size, conditioning, save/load."""

import torch

from dag_trl import FlowNetwork


def tiny_flow(**overrides) -> FlowNetwork:
    torch.manual_seed(0)
    kwargs = dict(cross_attention_dim=32, block_out_channels=(8, 16), attention_heads=2, time_embedding_dim=8)
    kwargs.update(overrides)
    return FlowNetwork(**kwargs)


def test_default_architecture_has_the_papers_size_and_layout():
    flow = FlowNetwork()
    parameters = sum(p.numel() for p in flow.parameters())
    assert 6_000_000 < parameters < 7_000_000
    assert [type(block).__name__ for block in flow.down_blocks] == [
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
    ]  # fmt: skip
    assert flow.time_embedding.linear_1.in_features == 64 and flow.time_embedding.linear_2.out_features == 256
    assert flow.head.in_features == 256 and flow.head.out_features == 1


def test_output_is_one_float32_scalar_per_sample_and_depends_on_time_and_text():
    flow = tiny_flow().eval()
    latents = torch.randn(3, 4, 8, 8)
    text = torch.randn(3, 6, 32)
    out = flow(latents, torch.tensor([981, 501, 1]), text)
    assert out.shape == (3,) and out.dtype == torch.float32
    other_time = flow(latents, torch.tensor([1, 501, 981]), text)
    other_text = flow(latents, torch.tensor([981, 501, 1]), torch.randn(3, 6, 32))
    assert not torch.allclose(out, other_time) and not torch.allclose(out, other_text)
    # Per-sample independence: a sample's output does not depend on its batch neighbours.
    torch.testing.assert_close(flow(latents[:1], torch.tensor([981]), text[:1]), out[:1], rtol=1e-5, atol=1e-6)


def test_save_pretrained_round_trip(tmp_path):
    flow = tiny_flow(block_out_channels=(8, 16, 16), layers_per_block=2)
    flow.save_pretrained(tmp_path)
    loaded = FlowNetwork.from_pretrained(tmp_path)
    assert loaded.config.block_out_channels == [8, 16, 16] and loaded.config.layers_per_block == 2
    for (name, a), (_, b) in zip(flow.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_log_flows_of_hundreds_of_nats_keep_float32_precision_inside_bf16_autocast():
    from dag_trl.models import LogPartitionHead

    flow = tiny_flow().eval()
    with torch.no_grad():
        flow.head.bias.fill_(-900.3)  # a summed log-flow on the shapes model; bfloat16's spacing there is 4
    latents, timesteps, text = torch.randn(3, 4, 8, 8), torch.tensor([981, 501, 1]), torch.randn(3, 6, 32)
    expected = flow(latents, timesteps, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as accelerate wraps a prepared model under bf16
        assert torch.equal(flow(latents, timesteps, text), expected)
    head = LogPartitionHead(32)
    with torch.no_grad():
        head.linear.bias.fill_(2.0123)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(head(text), head.linear.bias.expand(3))


def test_pooled_embedding_conditions_the_flow_when_configured(tmp_path):
    import pytest

    flow = tiny_flow(pooled_embedding_dim=5).eval()
    latents, text, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 32), torch.randn(2, 5)
    with torch.no_grad():
        out = flow(latents, torch.tensor([981, 501]), text, pooled)
        other = flow(latents, torch.tensor([981, 501]), text, pooled + 1)
    assert not torch.allclose(out, other)
    with pytest.raises(ValueError, match=r"built with pooled_embedding_dim=5 and needs the pooled prompt embedding"):
        flow(latents, torch.tensor([981, 501]), text)
    flow.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = FlowNetwork.from_pretrained(tmp_path)(latents, torch.tensor([981, 501]), text, pooled)
    torch.testing.assert_close(reloaded, out)
    plain = tiny_flow().eval()  # SD 1.x: no pooled input, a pooled tensor is ignored
    with torch.no_grad():
        assert torch.equal(plain(latents, 5, text, pooled), plain(latents, 5, text))
