"""focuslens.core.forward: the partial (early-stopping) forward pass."""

import pytest
import torch

import focuslens as fl


# --------------------------------------------------------------------------------------------------
# run_until: the partial forward


def _qk_names(model, layer):
    from focuslens.core.attention import layer_attention

    la = layer_attention(model, layer)
    return [la.q_hook, la.k_hook]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_run_until_equals_full_forward_and_stops(fixture, request, tok):
    from focuslens.core.forward import run_until
    from focuslens.testing import grab_hooks

    model = request.getfixturevalue(fixture)
    ids = torch.tensor([tok("The capital of Marn is Pell. The capital of Quo is Vey.").input_ids])
    names = _qk_names(model, 0) + ["blocks.0.hook_resid_post"]
    full = grab_hooks(model, ids, names)
    later = []  # a hook on the last layer: must never run when only layer 0 is needed

    def spy(x, hook):
        later.append(hook.name)
        return x

    with fl.core.attach_hooks(model, [("blocks.1.hook_resid_pre", spy), (_qk_names(model, 1)[0], spy)]):
        got = run_until(model, ids, names=names)
        assert fl.core.count_hooks(model) == 2  # only the spies: run_until left none of its own
    assert later == []
    assert sorted(got) == sorted(names)
    for n in names:
        assert got[n].shape[0] == 1 and not got[n].requires_grad
        assert torch.equal(got[n][0], full[n]), n  # same computation, bit-identical
    # the extra hooks= form: the function runs (and may modify), the pass still stops after it
    seen = []
    out = run_until(model, ids, hooks=[(names[0], lambda x, hook: seen.append(x.shape) or x)])
    assert out == {} and len(seen) == 1 and later == []
    assert fl.core.count_hooks(model) == 0


def test_run_until_right_padded_batch_equals_single(tiny_llama, tok):
    from focuslens.core.forward import run_until

    seqs = [tok(t).input_ids for t in ("The capital of Marn is Pell.", "Quo is a city. The capital of Vey is Zor.")]
    P = max(map(len, seqs))
    toks = torch.full((2, P), tok.pad_token_id or 0)
    mask = torch.zeros(2, P, dtype=torch.long)
    for b, s in enumerate(seqs):
        toks[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
    names = _qk_names(tiny_llama, 1)
    batched = run_until(tiny_llama, toks, names=names, attention_mask=mask)
    for b, s in enumerate(seqs):
        single = run_until(tiny_llama, torch.tensor(s), names=names)  # [pos] is accepted too
        for n in names:
            torch.testing.assert_close(batched[n][b, :len(s)], single[n][0], atol=1e-6, rtol=1e-6)
    assert fl.core.count_hooks(tiny_llama) == 0


def test_run_until_error_paths_leave_no_hooks(tiny_llama, tok):
    from focuslens.core.forward import run_until

    ids = torch.tensor([tok("The capital of Marn is Pell.").input_ids])
    base = tiny_llama(ids)

    def boom(x, hook):
        raise KeyError("inside hook")

    with pytest.raises(KeyError, match="inside hook"):
        run_until(tiny_llama, ids, names=_qk_names(tiny_llama, 1), hooks=[(_qk_names(tiny_llama, 0)[0], boom)])
    assert fl.core.count_hooks(tiny_llama) == 0
    with pytest.raises(ValueError, match="Unknown hook name.*blocks.7.attn.hook_q"):
        run_until(tiny_llama, ids, names=["blocks.7.attn.hook_q"])
    with pytest.raises(ValueError, match="at least one hook name"):
        run_until(tiny_llama, ids)
    assert fl.core.count_hooks(tiny_llama) == 0
    assert torch.equal(tiny_llama(ids), base)  # the model is untouched


def test_run_until_reports_hooks_that_never_fired(tiny_llama, tok):
    from focuslens.core.forward import run_until

    class Skipping:  # a backend whose forward never reaches one of the hook points
        def __init__(self, model):
            self.model, self.hook_dict, self.cfg = model, model.hook_dict, model.cfg
            self._forward_pre_hooks = {}

        def __call__(self, tokens, **kw):
            return self.model(tokens, stop_at_layer=1)

    ids = torch.tensor([tok("The capital of Marn is Pell.").input_ids])
    with pytest.raises(RuntimeError, match=r"ended before hook\(s\).*blocks.1"):
        run_until(Skipping(tiny_llama), ids, names=_qk_names(tiny_llama, 0) + _qk_names(tiny_llama, 1))
    assert fl.core.count_hooks(tiny_llama) == 0
