import torch

from guardrail.residual import Site, patch_residual, read_residual


def _batch(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def test_hook_read_equals_hidden_states(tiny_pair):
    model = tiny_pair.a.model
    ids, mask = _batch(tiny_pair.tokenizer, ["hello world", "a much longer prompt here"])
    from guardrail.residual.hf import position_ids_for

    full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), output_hidden_states=True)
    got = read_residual(model, 0, ids, mask)
    assert torch.equal(got, full.hidden_states[1])


def test_batched_read_matches_single_prompt(tiny_pair):
    tok, model = tiny_pair.tokenizer, tiny_pair.b.model
    texts = ["short", "a somewhat longer prompt"]
    ids, mask = _batch(tok, texts)
    batched = read_residual(model, 1, ids, mask)[0, -1]
    ids1, mask1 = _batch(tok, texts[:1])
    single = read_residual(model, 1, ids1, mask1)[0, -1]
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_patch_changes_output_and_detach_restores_bit_identical(tiny_pair):
    model = tiny_pair.a.model
    ids, mask = _batch(tiny_pair.tokenizer, ["restore me exactly"])
    before = model(input_ids=ids, attention_mask=mask).logits
    with patch_residual(model, 0, lambda h: h + 1.0):
        patched = model(input_ids=ids, attention_mask=mask).logits
    after = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(before, patched)
    assert torch.equal(before, after)


def test_patch_is_removed_on_error(tiny_pair):
    model = tiny_pair.a.model
    ids, mask = _batch(tiny_pair.tokenizer, ["boom"])
    before = model(input_ids=ids, attention_mask=mask).logits
    try:
        with patch_residual(model, 0, lambda h: h * 0):
            raise RuntimeError("caller failed")
    except RuntimeError:
        pass
    assert torch.equal(before, model(input_ids=ids, attention_mask=mask).logits)


def test_site_masks():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert Site(layer=0).prompt_mask(mask).sum() == 2
    assert Site(layer=0, positions="prompt").prompt_mask(mask).sum() == 8
    last2 = Site(layer=0, positions="prompt", last_n=2).prompt_mask(mask)
    assert last2.tolist() == [[False, False, False, True, True], [False, False, False, True, True]]
