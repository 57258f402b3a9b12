"""
Write scikit-learn's handwritten digits (1,797 greyscale scans of 8x8 pixels, UCI) as an image folder
with ten repeated captions, or as questions with one-word answers: the kind of real data the image
recipes must hold on.

    pip install scikit-learn
    python bench/digits_folder.py /tmp/digits            # /tmp/digits/{train,test}/metadata.jsonl + PNGs
    python train.py --model siglip --data /tmp/digits --time-budget 180
    python bench/digits_folder.py /tmp/digits-vqa --vqa
    python train.py --model paligemma --data /tmp/digits-vqa --time-budget 180

With --vqa each image gets two lines, {"file_name", "prefix", "suffix"}: "answer en what digit is
this?" -> "seven", and "answer en is the digit odd or even?" -> "odd".

Each image is saved as it was scanned (8x8, 17 grey levels stretched to 0..255); the model's
preprocessing resizes it. A seeded shuffle puts 1,597 images in train/ and 200 in test/.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def main():
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write")
    p.add_argument("--test", type=int, default=200, help="images held out in test/")
    p.add_argument("--vqa", action="store_true", help="questions and one-word answers instead of captions")
    args = p.parse_args()
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("this script needs scikit-learn: pip install scikit-learn")
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    splits = {"test": order[: args.test], "train": order[args.test :]}
    for split, indices in splits.items():
        folder = Path(args.out) / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in indices:
            name = f"{i:04d}.png"
            Image.fromarray((digits.images[i] * (255 / 16)).round().astype(np.uint8), mode="L").save(folder / name)
            digit = int(digits.target[i])
            if args.vqa:
                lines.append(json.dumps({"file_name": name, "prefix": "answer en what digit is this?",
                                         "suffix": WORDS[digit]}))
                lines.append(json.dumps({"file_name": name, "prefix": "answer en is the digit odd or even?",
                                         "suffix": "odd" if digit % 2 else "even"}))
            else:
                lines.append(json.dumps({"file_name": name, "text": f"a handwritten {WORDS[digit]}"}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        print(f"{folder}: {len(indices)} images, {len(lines)} lines")


if __name__ == "__main__":
    main()
