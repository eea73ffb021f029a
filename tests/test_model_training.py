"""Gradients flow through the cached checkpoints, and training lowers the loss."""

import torch
import torch.nn.functional as F

from tests.helpers import tiny_model


def segment_tokens():
    # Three segments of 5. Ids 1..5 appear only in segment 0; the loss is on segment 2 only.
    first = torch.arange(1, 6)
    rest = torch.arange(20, 30)
    return torch.cat([first, rest])[None]


def embedding_grad_of_first_segment(aggregation):
    model = tiny_model(memory="gla", aggregation=aggregation, boundary="reset", conv_size=0,
                       tie_embeddings=False).train()
    toks = segment_tokens()
    logits = model(toks)
    loss = F.cross_entropy(logits[0, 10:-1], toks[0, 11:])
    loss.backward()
    return model.embed.weight.grad[1:6].abs().sum().item()


def test_gradient_reaches_early_tokens_only_through_checkpoints():
    # With `reset`, segment 0 can influence segment 2 only via its cached checkpoint.
    assert embedding_grad_of_first_segment("grm") > 1e-6
    assert embedding_grad_of_first_segment("residual") > 1e-6
    assert embedding_grad_of_first_segment("none") == 0.0


def test_one_step_lowers_the_loss():
    for memory in ("gla", "delta"):
        model = tiny_model(memory=memory, aggregation="ssc").train()
        toks = torch.randint(0, 61, (4, 24), generator=torch.Generator().manual_seed(3))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

        def loss_fn():
            logits = model(toks[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1), toks[:, 1:].flatten())

        before = loss_fn()
        before.backward()
        u_rows = model.config.n_heads * model.config.dk  # the connector u: last rows of in_proj
        assert model.blocks[0].mixer.in_proj.weight.grad[-u_rows:].abs().sum() > 0
        opt.step()
        with torch.no_grad():
            assert loss_fn() < before.detach() - 1e-3
