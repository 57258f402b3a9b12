"""
The machinery that train.py and sample.py share. The model files at the project's root (gpt_llama.py,
moe.py, bpe.py, siglip.py, paligemma.py) import none of it: each stands alone.

Read in this order, from the command line to the data and back to the files a run leaves:

    flags.py          train.py's command line: every flag, its default from the model's TRAIN_RECIPE, its range
    runs.py           model files found by reading them, run and Hugging Face folders, checkpoints, tokenizers, devices
    data.py           the pipeline protocol train.py talks to, the window stream, the causal-LM pipeline
    corpus.py         text corpora to token shards, no torch; the one error type, UserError
    images.py         image data: pictures of shapes, image folders, the image-text and prefix-LM pipelines
    conversations.py  conversations to fine-tune a chat model on, scored on the assistant's tokens
    preferences.py    pairs of answers, one chosen and one rejected, to tune a chat model on by DPO
    chat.py           chat formats, rendered alike for training and for sample.py --chat
    lora.py           low-rank adapters on a model file's linear layers, saved merged and in peft's layout
    threads.py        how many CPU threads the steps run on, followed through the run
    plot.py           loss.png from a run's metrics.jsonl
    inside.py         sample.py --show: attention, next tokens, logit lens and routing, recorded from a forward
    pictures.py       sample.py --show: the pictures of what inside.py records
    hf_tokenizer.py   Hugging Face tokenizer.json files, read on top of bpe.py
"""
