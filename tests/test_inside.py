"""sample.py --show (llm_machinery/inside.py and pictures.py): the attention it records equals transformers'
output_attentions (eager attention, float32) for Llama, Qwen2, Mistral, Mixtral, SigLIP and PaliGemma; the
next-token view and the logit lens equal the model's own logits; the routing equals the router's top-k; the
pictures are PNGs; bad input gets one sentence."""

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import gpt_llama
import moe
import paligemma
import sample
import siglip
from llm_machinery import inside, pictures
from llm_machinery.corpus import UserError

from conftest import reference  # noqa: E402
from test_gpt_llama import hf_model as hf_llama  # noqa: E402
from test_moe import tiny_hf as hf_moe  # noqa: E402
from test_paligemma import IMAGE_TOKEN, N_IMAGE, VISION, hf_paligemma  # noqa: E402
from test_siglip import hf_siglip, random_inputs  # noqa: E402

transformers = reference("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


class Bytes:
    """A tokenizer whose ids are bytes, enough to label tokens."""

    special_tokens = {}

    def decode_bytes(self, ids):
        return bytes(i % 256 for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode(errors="replace")


def assert_pngs(paths):
    assert paths
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100
            image.verify()


@pytest.mark.parametrize("case", [
    dict(num_key_value_heads=2),  # grouped-query attention: each query head has its own map
    dict(arch="Qwen2", num_key_value_heads=2, tie_word_embeddings=True),
    dict(arch="Mistral", num_key_value_heads=1, sliding_window=8),  # 20 tokens: the window hides the oldest
], ids=["llama-gqa", "qwen2", "mistral-window"])
def test_text_attention_next_tokens_and_lens_equal_transformers_and_the_logits(tmp_path, case):
    ref = hf_llama(tmp_path, **case)
    ref.set_attn_implementation("eager")
    model = gpt_llama.Model.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    arrays = inside.look_at_text(model, Bytes(), ids)
    with torch.no_grad():
        out = ref(torch.tensor([ids]), output_attentions=True)
    assert len(out.attentions) == 2
    for i, expected in enumerate(out.attentions):
        torch.testing.assert_close(torch.from_numpy(arrays[f"attention.layers.{i}.attention"]), expected,
                                   atol=1e-5, rtol=0)
    if "window" in str(case):
        assert arrays["attention.layers.0.attention"][0, :, 19, :12].max() == 0  # only the last 8 are seen
    with torch.no_grad():
        probs = model(torch.tensor([ids]))[0][0].softmax(-1)
    # The next-token view is the softmax of the model's logits at each position, for the token that came.
    torch.testing.assert_close(torch.from_numpy(arrays["next_prob"]), probs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0])
    np.testing.assert_allclose(arrays["next_bits"], -np.log2(arrays["next_prob"].astype(np.float64)))
    top = probs.topk(5, dim=-1)
    assert np.array_equal(arrays["top_ids"], top.indices.numpy())
    torch.testing.assert_close(torch.from_numpy(arrays["top_probs"]), top.values)
    # The last layer's lens is the model's own prediction; an earlier layer's is not.
    assert np.array_equal(arrays["lens_ids"][-1], probs.argmax(-1).numpy())
    torch.testing.assert_close(torch.from_numpy(arrays["lens_probs"][-1]), probs.max(-1).values)
    assert not np.array_equal(arrays["lens_probs"][0], arrays["lens_probs"][-1])
    assert list(arrays["tokens"]) == inside.token_text(Bytes(), ids)


def test_mixtral_attention_routing_and_shares(tmp_path):
    ref = hf_moe("mixtral", tmp_path)
    ref.set_attn_implementation("eager")
    model = moe.Model.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 96, (17,), generator=torch.Generator().manual_seed(3)).tolist()
    arrays = inside.look_at_text(model, Bytes(), ids)
    with torch.no_grad():
        out = ref(torch.tensor([ids]), output_attentions=True, output_router_logits=True)
    for i, expected in enumerate(out.attentions):
        torch.testing.assert_close(torch.from_numpy(arrays[f"attention.layers.{i}.attention"]), expected,
                                   atol=1e-5, rtol=0)
    metrics = model.metrics()  # of the forward that look_at_text ran
    for i, router_logits in enumerate(out.router_logits):
        name = f"experts.layers.{i}.feed_forward.router"
        # Mixtral's router: the top 2 of the softmax, renormalised to sum to 1.
        top = router_logits.softmax(-1).topk(2, dim=-1)
        expected = torch.zeros(len(ids), 4).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        ours = torch.from_numpy(arrays[f"{name}.indices"])
        assert torch.equal(ours.sort(1).values, top.indices.sort(1).values)
        ours = torch.zeros(len(ids), 4).scatter(1, ours, torch.from_numpy(arrays[f"{name}.weights"]))
        torch.testing.assert_close(ours, expected)  # each expert with its own weight
        share = [metrics[f"load_l{i}_e{e}"] for e in range(4)]
        np.testing.assert_allclose(arrays[f"{name}.share"], share, rtol=1e-6)
        assert len(set(share)) > 1  # an uneven split, which a wrong share could not hide under
    paths = pictures.draw_text(arrays, tmp_path, "mixtral")
    assert [p.name for p in paths] == ["attention_layer00.png", "attention_layer01.png", "next_token.png",
                                       "logit_lens.png", "experts.png"]
    assert_pngs(paths)


@pytest.mark.parametrize("case", ["even", "odd"])
def test_siglip_towers_and_pooling_head_equal_transformers(tmp_path, case):
    ref = hf_siglip(tmp_path, case)
    model = siglip.Model.from_pretrained(tmp_path).eval()
    pixels, input_ids = random_inputs(case, batch=3)
    arrays = inside.look_at_images(model, Bytes(), pixels, input_ids, ["one", "two", "three"])
    with torch.no_grad():
        out = ref(pixel_values=pixels, input_ids=input_ids, output_attentions=True)
        patches = out.vision_model_output.last_hidden_state
        head = ref.vision_model.head
        probe = head.probe.expand(len(pixels), -1, -1)
        pooling = head.attention(probe, patches, patches, need_weights=True, average_attn_weights=False)[1]
    for i, expected in enumerate(out.vision_model_output.attentions):
        torch.testing.assert_close(torch.from_numpy(arrays[f"attention.vision.blocks.{i}.attn"]), expected,
                                   atol=1e-5, rtol=0)
    text = out.text_model_output.attentions
    for i, expected in enumerate(text):
        # The last text block asks only the pooled (last) position's query: its row is all there is.
        if i == len(text) - 1:
            expected = expected[:, :, -1:]
        torch.testing.assert_close(torch.from_numpy(arrays[f"attention.text.blocks.{i}.attn"]), expected,
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(arrays["pooling.vision_head"]), pooling[:, :, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(arrays["probs"]), model.classify(pixels, input_ids))
    assert_pngs(pictures.draw_images(arrays, ["a.png", "b.png", "c.png"], tmp_path, "siglip"))


@pytest.mark.parametrize("case", ["mqa", "gqa"])
def test_paligemma_decoder_attention_with_the_prefix_mask_equals_transformers(tmp_path, case):
    ref = hf_paligemma(tmp_path, case)
    model = paligemma.Model.from_pretrained(tmp_path).eval()
    g = torch.Generator().manual_seed(4)
    pixels = torch.rand(1, 3, VISION["image_size"], VISION["image_size"], generator=g) * 2 - 1
    prefix, answer = torch.randint(2, 80, (5,), generator=g).tolist(), torch.randint(2, 80, (3,), generator=g).tolist()
    arrays = inside.look_at_answer(model, Bytes(), pixels, prefix, answer)
    ids = torch.tensor([[IMAGE_TOKEN] * N_IMAGE + prefix + answer])
    token_type_ids = (torch.arange(ids.size(1)) >= N_IMAGE + len(prefix)).long()[None]
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixels, token_type_ids=token_type_ids, output_attentions=True)
    n_layers = len(out.attentions)
    L = N_IMAGE + len(prefix) + len(answer)
    for i, expected in enumerate(out.attentions):
        if i == n_layers - 1:  # the last layer asks the text positions' queries only
            expected = expected[:, :, N_IMAGE:]
        ours = torch.from_numpy(arrays[f"attention.layers.{i}.attention"])
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
        # The prefix-LM mask: the image and the prefix see each other, the answer only what came before.
        first = ours[0, :, -len(answer) - len(prefix)]  # the prefix's first token
        assert first[:, N_IMAGE + 1 :].sum() > 0 and (ours[0, :, -1, :] > 0).all()
        # Position t writes token t + 1: the rows of the answer's writers, over the image and over the text.
        rows = [L - len(answer) - 1 + j - (L - ours.size(2)) for j in range(len(answer))]
        torch.testing.assert_close(torch.from_numpy(arrays["image_attention"][i]),
                                   ours[0][:, rows, :N_IMAGE].transpose(0, 1))
        torch.testing.assert_close(torch.from_numpy(arrays["text_attention"][i]),
                                   ours[0][:, rows, N_IMAGE:].transpose(0, 1))
    assert_pngs(pictures.draw_answer(arrays, "shape.png", tmp_path, "paligemma"))


def test_recording_leaves_the_model_and_torch_as_they_were():
    torch.manual_seed(0)
    model = gpt_llama.Model(gpt_llama.Config(vocab_size=64)).eval()
    idx = torch.randint(0, 64, (1, 12))
    sdpa = F.scaled_dot_product_attention
    with torch.no_grad():
        plain = model(idx)[0]
        with inside.record(model) as rec:
            recorded = model(idx)[0]
    assert torch.equal(plain, recorded) and F.scaled_dot_product_attention is sdpa
    assert list(rec.attention) == ["layers.0.attention", "layers.1.attention"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_model_without_attention_and_too_long_a_prompt_get_one_sentence():
    class Bag(torch.nn.Module):  # a language model that never attends: embeddings straight to logits
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 50)

        def forward(self, idx):
            return self.embed(idx), None

    with pytest.raises(UserError, match="computes no attention that --show can see"):
        inside.look_at_text(Bag(), Bytes(), [1, 2, 3])
    model = gpt_llama.Model(gpt_llama.Config(vocab_size=256))
    with pytest.raises(UserError, match=f"is 70 tokens long and --show draws at most {inside.MAX_TOKENS}.* end at 'a{{29}}b'"):
        inside.look_at_text(model, Bytes(), list(b"a" * 63 + b"b" + b"c" * 6))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny random Llama checkpoint with a BPE tokenizer.model, as sample.py --hf reads it."""
    import bpe

    root = tmp_path_factory.mktemp("show")
    tokenizer = bpe.train("The cat sat on the mat. The dog ate the cat's food. " * 20, 300)
    tokenizer.save(root / "tok")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.n_vocab + 256, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    ref = transformers.LlamaForCausalLM(config).eval()
    ref.save_pretrained(root / "hf")
    shutil.copy(root / "tok" / "tokenizer.tiktoken", root / "hf" / "tokenizer.model")
    ref.set_attn_implementation("eager")
    return root / "hf", ref


@pytest.mark.slow
def test_show_writes_pictures_and_numbers_that_equal_transformers(llama_folder, tmp_path, capsys):
    folder, ref = llama_folder
    assert sample.main(["--hf", str(folder), "--prompt", "The cat sat on the mat.", "--show", "--show-dir",
                        str(tmp_path / "pics")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[-1] == str(tmp_path / "pics" / "numbers.npz")
    assert_pngs([Path(p) for p in printed[:-1]])
    # Only the numbers file: its token ids through transformers give its attention maps.
    numbers = np.load(tmp_path / "pics" / "numbers.npz")
    with torch.no_grad():
        out = ref(torch.from_numpy(numbers["token_ids"])[None], output_attentions=True)
    for i, expected in enumerate(out.attentions):
        torch.testing.assert_close(torch.from_numpy(numbers[f"attention.layers.{i}.attention"]), expected,
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(numbers["top_probs"]), out.logits[0].softmax(-1).topk(5).values)


@pytest.mark.parametrize("argv, match", [
    (["--show-dir", "{file}/pics"], "cannot write the pictures into .*is a file"),
    (["--chat"], "--show draws one prompt, not a conversation"),
    (["--prompt", "The cat " * 40], r"the prompt is \d+ tokens long and --show draws at most 64.* end at '.*cat'"),
])
def test_show_bad_input_gets_one_sentence_and_writes_nothing(llama_folder, tmp_path, capsys, argv, match):
    folder, _ = llama_folder
    (tmp_path / "file").write_text("")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    prompt = [] if "--prompt" in argv else ["--prompt", "The cat"]
    assert sample.main(["--hf", str(folder), "--show", "--show-dir", str(tmp_path / "out")] + prompt + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(match, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_show_without_matplotlib_names_the_extra(llama_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    folder, _ = llama_folder
    assert sample.main(["--hf", str(folder), "--prompt", "The cat", "--show", "--show-dir", str(tmp_path / "o")]) == 2
    assert 'pip install -e ".[plots]"' in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def image_runs(tmp_path_factory):
    """siglip.py and paligemma.py folders trained for a few steps on the built-in shapes, and a picture."""
    import train
    from llm_machinery import images

    root = tmp_path_factory.mktemp("image_runs")
    tiny = ["--set", "image_size=16", "--set", "patch_size=8", "--set", "vision_dim=16", "--set", "vision_layers=1",
            "--set", "vision_heads=2", "--set", "vision_mlp_dim=32", "--batch-size", "8", "--max-steps", "3",
            "--eval-every", "0", "--sample-tokens", "0", "--no-plot", "--threads", "1"]
    towers = {"siglip": ["--set", "text_dim=16", "--set", "text_layers=1", "--set", "text_heads=2",
                         "--set", "text_mlp_dim=32"],
              "paligemma": ["--set", "dim=16", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "head_dim=8",
                            "--set", "ffn_dim=32", "--set", "max_seq_len=40"]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMS_FROM_SCRATCH_CACHE", str(root / "cache"))
        for name, flags in towers.items():
            assert train.main(["--model", name, "--out", str(root / name)] + tiny + flags) == 0
    picture = images.Shapes().draw(np.random.default_rng(3), "green", "square", 24)[0]
    picture.save(root / "shape.png")
    return root, root / "shape.png"


@pytest.mark.slow
def test_show_for_image_models_writes_their_pictures(image_runs, tmp_path, capsys):
    root, picture = image_runs
    assert sample.main([str(root / "siglip"), "--image", str(picture), str(picture), "--labels", "a green square,a red circle",
                        "--show", "--show-dir", str(tmp_path / "s")]) == 0
    assert_pngs([tmp_path / "s" / "captions.png", tmp_path / "s" / "pooling.png"])
    numbers = np.load(tmp_path / "s" / "numbers.npz")
    assert numbers["probs"].shape == (2, 2) and numbers["pooling.vision_head"].shape == (2, 2, 4)
    capsys.readouterr()
    assert sample.main([str(root / "paligemma"), "--image", str(picture), "--prompt", "answer en what color?",
                        "--temperature", "0", "--max-new-tokens", "3", "--show", "--show-dir", str(tmp_path / "p")]) == 0
    answer = capsys.readouterr().out.splitlines()[0]
    numbers = np.load(tmp_path / "p" / "numbers.npz")
    n_answer = len(numbers["tokens"]) - int(numbers["prefix_len"])
    assert numbers["image_attention"].shape == (2, n_answer, 2, 4)  # layers, answer tokens, heads, patches
    assert "".join(numbers["tokens"][-n_answer:]) == answer.replace(" ", "\u00b7")
    assert_pngs([tmp_path / "p" / "answer_image.png", tmp_path / "p" / "answer_text.png"])
    assert sample.main([str(root / "paligemma"), "--image", str(picture), str(picture), "--prompt", "what?", "--show",
                        "--show-dir", str(tmp_path / "q")]) == 2
    assert "--show draws where the answer looked in one image" in capsys.readouterr().err
