"""paligemma.py against Hugging Face transformers' PaliGemmaForConditionalGeneration, plus the loss, the
prefix-LM mask, cached decoding and the config's checks."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import paligemma
from paligemma import Config, Model, preprocess, sample_next, suffix_targets

from conftest import load_on_meta, reference  # noqa: E402

transformers = reference("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


VOCAB, IMAGE_TOKEN = 80, 80  # the image placeholder lies outside the text vocabulary, as in the released models
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=12,
              patch_size=4, vision_use_head=False, layer_norm_eps=1e-3)
# head_dim differs from hidden_size / num_attention_heads in both; a large eps that a wrong one could not hide under.
CASES = {
    "mqa": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, head_dim=12),
    "gqa": dict(hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, head_dim=10, rms_norm_eps=1e-2, rope_parameters=dict(rope_theta=500.0)),
}
N_IMAGE = (VISION["image_size"] // VISION["patch_size"]) ** 2


def hf_paligemma(folder, case):
    """A tiny random PaliGemmaForConditionalGeneration with eager attention, saved into folder."""
    torch.manual_seed(0)
    text = dict(model_type="gemma", vocab_size=VOCAB, max_position_embeddings=64, **CASES[case])
    config = transformers.PaliGemmaConfig(text_config=text, vision_config=VISION, projection_dim=text["hidden_size"],
                                          image_token_index=IMAGE_TOKEN)
    ref = transformers.PaliGemmaForConditionalGeneration(config).eval()
    ref.set_attn_implementation("eager")
    # Fresh norms are zeros (Gemma) or ones and biases zeros; random ones make a swap or a missing 1 + w show.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(-0.5, 0.5) if "language_model" in name else p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "embed_tokens" in name:
                p.normal_(0.0, 0.3)
            elif "language_model" in name:  # larger than the default 0.02, so that the GeGLU's GELU leaves
                p.normal_(0.0, 0.25)  # its near-linear range and greedy decoding does not repeat one token
    ref.save_pretrained(folder)
    return ref


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = hf_paligemma(folder, request.param)
    return ref, Model.from_pretrained(folder), folder


def batch(seed=1, B=3, T=10):
    """Images, text ids (B, T), prefix lengths and how many tokens of each row are not padding."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.rand(B, 3, VISION["image_size"], VISION["image_size"], generator=g) * 2 - 1
    ids = torch.randint(2, VOCAB, (B, T), generator=g)
    prefix_len = torch.tensor([4, 7, T][:B])
    lengths = torch.tensor([T, T - 2, T][:B])  # row 1 ends in two padding tokens
    return pixel_values, ids, prefix_len, lengths


def hf_logits(ref, pixel_values, ids, prefix_len, lengths):
    """transformers' text logits for the same input: image placeholders in front, token_type_ids 0 over image
    and prefix (one bidirectional block) and 1 over the suffix, attention_mask 0 over the padding."""
    B, T = ids.shape
    full = torch.cat([torch.full((B, N_IMAGE), IMAGE_TOKEN), ids], dim=1)
    pos = torch.arange(N_IMAGE + T)
    token_type_ids = (pos[None] >= N_IMAGE + prefix_len[:, None]).long()
    attention_mask = (pos[None] < N_IMAGE + lengths[:, None]).long()
    with torch.no_grad():
        out = ref(input_ids=full, pixel_values=pixel_values, token_type_ids=token_type_ids,
                  attention_mask=attention_mask)
    return out.logits[:, N_IMAGE:]


def assert_logits_match(ref, model):
    """Our text logits equal transformers' on batch(), row by row up to each row's padding."""
    pixel_values, ids, prefix_len, lengths = batch()
    expected = hf_logits(ref, pixel_values, ids, prefix_len, lengths)
    with torch.no_grad():
        logits, _ = model(pixel_values, ids, prefix_len)
    for row, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(logits[row, :n], expected[row, :n], atol=1e-4, rtol=1e-4)


def test_logits_match_transformers_with_prefix_mask_and_padding(pair):
    ref, model, _ = pair
    assert_logits_match(ref, model)


def test_loss_is_cross_entropy_on_suffix_tokens(pair):
    _, model, _ = pair
    pixel_values, ids, prefix_len, lengths = batch()
    pad = 1
    ids[1, 8:] = pad
    targets = suffix_targets(ids, prefix_len, pad_id=pad)
    logits, loss = model(pixel_values, ids, prefix_len, targets)
    terms = []
    for row in range(len(ids)):
        for t in range(prefix_len[row] - 1, lengths[row] - 1):  # position t predicts suffix token t + 1
            terms.append(F.cross_entropy(logits[row, t], ids[row, t + 1]))
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert (targets[2] == -100).all()  # a row that is all prefix has nothing to score


def test_mask_is_bidirectional_over_the_prefix_and_causal_over_the_suffix(pair):
    _, model, _ = pair
    pixel_values, ids, prefix_len, _ = batch(B=1)
    prefix_len = torch.tensor([5])
    with torch.no_grad():
        base, _ = model(pixel_values, ids, prefix_len)
        later_prefix = ids.clone()
        later_prefix[0, 4] = (ids[0, 4] + 1) % VOCAB
        changed, _ = model(pixel_values, later_prefix, prefix_len)
        later_suffix = ids.clone()
        later_suffix[0, 8] = (ids[0, 8] + 1) % VOCAB
        causal, _ = model(pixel_values, later_suffix, prefix_len)
        other_image, _ = model(-pixel_values, ids, prefix_len)
    assert not torch.allclose(changed[0, 1], base[0, 1])  # an earlier prefix position sees a later one
    assert torch.equal(causal[0, :8], base[0, :8])  # no suffix position sees a later one
    assert not torch.allclose(causal[0, 8:], base[0, 8:])
    assert not torch.allclose(other_image[0, 0], base[0, 0])  # the text sees the image


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_decoding_equals_full_recomputation(pair, temperature):
    """Greedy, and sampled with the same seed: a sample follows the whole distribution, so a cache that
    shifts the logits changes the tokens even where the argmax would not."""
    _, model, _ = pair
    pixel_values, ids, _, _ = batch(B=2, T=6)
    out = model.generate(pixel_values, ids, 12, temperature=temperature, seed=5)
    tokens, generator = ids, torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(12):  # recompute everything for each token; the prompt stays the prefix
            logits, _ = model(pixel_values, tokens, torch.tensor([6, 6]))
            new = sample_next(logits[:, -1], temperature, None, None, generator)
            tokens = torch.cat([tokens, new[:, None]], dim=1)
    assert torch.equal(out, tokens)


def test_greedy_generate_matches_transformers(pair):
    ref, model, _ = pair
    pixel_values, ids, _, _ = batch(B=2, T=6)
    full = torch.cat([torch.full((2, N_IMAGE), IMAGE_TOKEN), ids], dim=1)
    expected = ref.generate(input_ids=full, pixel_values=pixel_values, token_type_ids=torch.zeros_like(full),
                            attention_mask=torch.ones_like(full), max_new_tokens=10, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[:, N_IMAGE:]
    assert torch.equal(model.generate(pixel_values, ids, 10, temperature=0), expected)


def test_stream_stops_at_eos_and_sampling_is_seeded(pair):
    _, model, _ = pair
    pixel_values, ids, _, _ = batch(B=1, T=6)
    first = model.generate(pixel_values, ids, 1, temperature=0)[0, -1].item()
    assert len(list(model.generate_stream(pixel_values, ids, 10, temperature=0, eos_id=first))) == 1
    a = model.generate(pixel_values, ids, 8, temperature=1.0, top_k=5, top_p=0.9, seed=3)
    assert torch.equal(a, model.generate(pixel_values, ids, 8, temperature=1.0, top_k=5, top_p=0.9, seed=3))


@pytest.mark.parametrize("field,value", [
    ("dim", 0), ("n_layers", -1), ("head_dim", 7), ("n_kv_heads", 3), ("patch_size", 5), ("vision_heads", 3),
    ("norm_eps", 0.0), ("rope_theta", float("inf")), ("vocab_size", 1.5), ("n_heads", True), ("max_seq_len", 4),
])
def test_bad_config_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value})


def test_paligemma2_is_refused_clearly(tmp_path):
    text = dict(model_type="gemma2", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=1, head_dim=12)
    config = transformers.PaliGemmaConfig(text_config=text, vision_config=VISION, projection_dim=32)
    config.architectures = ["PaliGemmaForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="PaliGemma 2"):
        Model.from_pretrained(tmp_path)


def test_bad_inputs_get_clear_errors(pair):
    _, model, _ = pair
    pixel_values, ids, _, _ = batch(B=1, T=6)
    with pytest.raises(ValueError, match="prefix_len"):
        model(pixel_values, ids, torch.tensor([0]))
    with pytest.raises(ValueError, match="context"):
        model.generate(pixel_values, ids, 64)
    with pytest.raises(ValueError, match="one image per prefix"):
        model.generate(pixel_values.repeat(2, 1, 1, 1), ids, 2)


def test_unexpected_tensors_are_refused(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, folder = pair
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({**tensors, "language_model.model.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not have: language_model.model.extra.weight"):
        Model.from_pretrained(tmp_path)


def test_a_checkpoint_with_siglips_pooling_head_loads_without_it(tmp_path, capsys):
    """transformers builds SigLIP's pooling head (vision_tower.head.*) whenever the vision config leaves
    vision_use_head at its default; PaliGemma never runs it. Its tensors are skipped with one note, the
    logits still equal transformers', and any other stray tensor is still refused."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    vision = {k: v for k, v in VISION.items() if k != "vision_use_head"}
    text = dict(model_type="gemma", vocab_size=VOCAB, max_position_embeddings=64, **CASES["gqa"])
    config = transformers.PaliGemmaConfig(text_config=text, vision_config=vision, projection_dim=text["hidden_size"],
                                          image_token_index=IMAGE_TOKEN)
    ref = transformers.PaliGemmaForConditionalGeneration(config).eval()
    ref.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    head = [k for k in tensors if ".head." in k]
    assert head, "transformers no longer builds the pooling head; this test needs another checkpoint"
    capsys.readouterr()
    model = Model.from_pretrained(tmp_path)
    notes = capsys.readouterr().err.splitlines()
    assert notes == [f"note: {tmp_path} holds SigLIP's pooling head (vision_tower.head.*, {len(head)} tensors), "
                     "which PaliGemma does not use; skipped"]
    assert_logits_match(ref, model)
    save_file({**tensors, "model.vision_tower.vision_model.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not have: model.vision_tower.vision_model.extra.weight"):
        Model.from_pretrained(tmp_path)


def test_a_stored_copy_of_the_tied_head_loads_and_an_untied_head_is_refused(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, model, folder = pair
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    embedding = next(v for k, v in tensors.items() if k.endswith("embed_tokens.weight"))
    save_file({**tensors, "lm_head.weight": embedding.clone()}, tmp_path / "model.safetensors")
    torch.testing.assert_close(Model.from_pretrained(tmp_path).state_dict(), model.state_dict(), rtol=0, atol=0)
    save_file({**tensors, "lm_head.weight": embedding + 1}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="differs from the embedding"):
        Model.from_pretrained(tmp_path)


def test_from_pretrained_builds_on_meta_and_keeps_the_files_tensors(pair, monkeypatch):
    """The model is built on the meta device, where the random initialisation touches no memory, and the
    tensors read from the file become its parameters: the weights are never held twice."""
    _, model, folder = pair
    loaded = load_on_meta(paligemma, folder, monkeypatch)
    for name in ("rope_cos", "rope_sin"):  # buffers, computed again on the CPU
        assert torch.equal(getattr(loaded, name), getattr(model, name))


@pytest.mark.parametrize("layout", ["hub", "runtime"])
def test_other_tensor_layouts_load_the_same_weights(pair, tmp_path, layout):
    """The released checkpoints name the vision tower vision_tower.vision_model.*; transformers 5 holds the
    model as model.vision_tower.*, model.language_model.* (without the inner .model)."""
    from safetensors.torch import load_file, save_file

    _, model, folder = pair
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    if layout == "hub":
        rename = lambda k: k.replace("vision_tower.", "vision_tower.vision_model.")  # noqa: E731
    else:
        rename = lambda k: "model." + k.replace("language_model.model.", "language_model.")  # noqa: E731
    save_file({rename(k): v for k, v in tensors.items()}, tmp_path / "model.safetensors")
    loaded = Model.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())


def test_left_padded_batch_generates_what_each_row_generates_alone(pair):
    _, model, _ = pair
    pixel_values, ids, _, _ = batch(B=2, T=6)
    padded = ids.clone()
    padded[1, :3] = 0  # row 1: three padding tokens, then a prefix of three
    out = model.generate(pixel_values, padded, 8, temperature=0, prefix_len=torch.tensor([6, 3]))
    assert torch.equal(out[0], model.generate(pixel_values[:1], ids[:1], 8, temperature=0)[0])
    alone = model.generate(pixel_values[1:], ids[1:, 3:], 8, temperature=0)[0]
    assert torch.equal(out[1, 3:], alone)


def test_loss_equals_transformers_on_the_same_labels(pair):
    """transformers scores labels[t + 1] at position t: labels are the suffix ids and -100 over the image,
    the prefix and the padding; ours takes the same from suffix_targets."""
    ref, model, _ = pair
    pixel_values, ids, prefix_len, lengths = batch()
    pad = 1
    B, T = ids.shape
    pos = torch.arange(T)
    ids = ids.masked_fill(pos[None] >= lengths[:, None], pad)
    text_labels = ids.masked_fill((pos[None] < prefix_len[:, None]) | (pos[None] >= lengths[:, None]), -100)
    full = torch.cat([torch.full((B, N_IMAGE), IMAGE_TOKEN), ids], dim=1)
    labels = torch.cat([torch.full((B, N_IMAGE), -100), text_labels], dim=1)
    full_pos = torch.arange(N_IMAGE + T)
    with torch.no_grad():
        expected = ref(input_ids=full, pixel_values=pixel_values, labels=labels,
                       token_type_ids=(full_pos[None] >= N_IMAGE + prefix_len[:, None]).long(),
                       attention_mask=(full_pos[None] < N_IMAGE + lengths[:, None]).long()).loss
        _, loss = model(pixel_values, ids, prefix_len, suffix_targets(ids, prefix_len, pad_id=pad))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_greedy_generate_of_a_left_padded_batch_matches_transformers(pair):
    """Prompts of different lengths in one batch: transformers takes them left-padded before the image
    tokens with an attention mask, ours pads between image and prefix; the new tokens are the same."""
    ref, model, _ = pair
    pixel_values, ids, _, _ = batch(B=3, T=7)
    prefix_len = torch.tensor([7, 3, 5])
    pad = (7 - prefix_len)[:, None]
    ours_ids = ids.masked_fill(torch.arange(7)[None] < pad, 0)
    out = model.generate(pixel_values, ours_ids, 8, temperature=0, prefix_len=prefix_len)[:, 7:]
    width = N_IMAGE + 7
    full = torch.zeros(3, width, dtype=torch.long)
    attention_mask = torch.zeros(3, width, dtype=torch.long)
    for row, n in enumerate(prefix_len.tolist()):
        full[row, width - N_IMAGE - n :] = torch.cat([torch.full((N_IMAGE,), IMAGE_TOKEN), ids[row, 7 - n :]])
        attention_mask[row, width - N_IMAGE - n :] = 1
    expected = ref.generate(input_ids=full, pixel_values=pixel_values, attention_mask=attention_mask,
                            token_type_ids=torch.zeros_like(full), max_new_tokens=8, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[:, width:]
    assert torch.equal(out, expected)


def test_training_forward_compiles_without_graph_breaks():
    """A forward with its loss is one graph for torch.compile: nothing in it waits on a value of the
    device (a check of prefix_len's values, .item(), a data-dependent branch)."""
    model = Model(Config(image_size=8, patch_size=4, vision_dim=16, vision_layers=1, vision_heads=2,
                         vision_mlp_dim=24, vocab_size=20, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8,
                         ffn_dim=24, max_seq_len=16))
    ids, prefix_len = torch.randint(0, 20, (3, 8)), torch.tensor([2, 5, 8])
    explanation = torch._dynamo.explain(model)(torch.randn(3, 3, 8, 8), ids, prefix_len,
                                               suffix_targets(ids, prefix_len))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# transformers' processor turns its output into numpy arrays in a way numpy 2 warns about.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_paligemma_processor_output_maps_onto_forward(pair):
    """The recipe of paligemma.py's docstring: a PaliGemmaProcessor's output, its placeholders dropped,
    prefix_len from its token_type_ids and attention_mask and suffix_targets give transformers' logits,
    and its loss on the processor's own labels. A word-level tokenizer stands in for Gemma's."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    ref, model, _ = pair
    words = ["<pad>", "<eos>", "<bos>", "<unk>", "\n", "caption", "answer", "en", "what", "color?", "a", "red", "cat",
             "on", "mat"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(VOCAB - len(words))])}
    words_of = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words_of.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                                      pre_tokenizers.Split("\n", "isolated")])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words_of, bos_token="<bos>", eos_token="<eos>",
                                                     pad_token="<pad>", unk_token="<unk>", padding_side="right")
    image_processor = transformers.SiglipImageProcessor(size={"height": 12, "width": 12})
    image_processor.image_seq_length = N_IMAGE
    processor = transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    assert processor.image_token_id == IMAGE_TOKEN
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)) for _ in range(2)]
    out = processor(images=pictures, text=["<image>caption en", "<image>answer en what color?"],
                    suffix=["a red cat on a mat", "red"], padding="longest", return_tensors="pt")

    input_ids = out["input_ids"][:, N_IMAGE:]
    prefix_len = ((out["token_type_ids"] == 0) & (out["attention_mask"] == 1)).sum(1) - N_IMAGE
    targets = suffix_targets(input_ids, prefix_len, tokenizer.pad_token_id)
    assert prefix_len.tolist() == [4, 6]  # bos, the prefix's words, "\n"
    torch.testing.assert_close(out["pixel_values"], preprocess(pictures, 12), atol=1e-6, rtol=0)
    with torch.no_grad():
        expected = ref(**out)
        logits, loss = model(out["pixel_values"], input_ids, prefix_len, targets)
    for row, n in enumerate((out["attention_mask"].sum(1) - N_IMAGE).tolist()):
        torch.testing.assert_close(logits[row, :n], expected.logits[row, N_IMAGE : N_IMAGE + n], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, expected.loss, atol=1e-5, rtol=1e-5)
