"""``rm:MODEL`` with a sequence classifier (TRL's reward-model-by-name): a directory or a Hub id
(here a local Hugging Face cache layout, offline), scored on the chat-formatted prompt + completion."""
import pytest
import torch

from conftest import fake_hub_cache
from rlhf.errors import UserError
from rlhf.rewards import load_rewards, score


def save_classifier(tiny_model, path, num_labels: int = 1) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = LlamaConfig.from_pretrained(tiny_model)
    cfg.num_labels = num_labels
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(cfg)
    torch.nn.init.normal_(model.score.weight, std=0.5)  # scores of order 1, not 0.02
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def classifier(tiny_model, tmp_path_factory):
    return save_classifier(tiny_model, tmp_path_factory.mktemp("tiny-rm"))


def by_hand(path, texts) -> list[float]:
    """Each text alone (no padding): the score head on the final hidden state of its last token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path)
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt", add_special_tokens=False).input_ids
            assert ids[0, -1] != tok.pad_token_id  # the forward's "last non-pad token" is the last one
            hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
            out.append(float(model.score(hidden)))
    return out


PROMPTS = [[{"role": "user", "content": "What is 12 + 30?"}], [{"role": "user", "content": "What is 2 + 3?"}]]
COMPLETIONS = [[{"role": "assistant", "content": "42"}], [{"role": "assistant", "content": "it is 5, I think"}]]


def test_a_classifier_directory_scores_the_chat_formatted_text(classifier):
    fns = load_rewards([f"rm:{classifier}"])
    tok = fns[0].fn.tokenizer
    texts = [tok.apply_chat_template(p + c, tokenize=False) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert texts[0] == "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n"
    got, means, _ = score(fns, PROMPTS, COMPLETIONS, {})
    # the batch is right-padded to the longer text; causal attention keeps padding out of the real
    # tokens' states, so each row equals its lone forward up to float32 summation order (~1e-6 on O(1))
    assert got.tolist() == pytest.approx(by_hand(classifier, texts), abs=1e-4)
    assert len(set(got.tolist())) == 2 and means[f"rm:{classifier}"] == pytest.approx(float(got.mean()), abs=1e-6)
    plain = score(fns, ["What is 2 + 3?"], [" 5"], {})[0].tolist()  # a text prompt: prompt + completion
    assert plain == pytest.approx(by_hand(classifier, ["What is 2 + 3? 5"]), abs=1e-4)


def test_a_classifier_by_hub_id_from_the_cache(classifier, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub_cache(tmp_path / "hf" / "hub", "someone/tiny-rm", classifier)
    by_id = score(load_rewards(["rm:someone/tiny-rm"]), PROMPTS, COMPLETIONS, {})[0]
    by_dir = score(load_rewards([f"rm:{classifier}"]), PROMPTS, COMPLETIONS, {})[0]
    assert torch.equal(by_id, by_dir)  # the same files, the same code
    with pytest.raises(UserError, match="reward model rm:someone/not-cached: could not fetch model"):
        load_rewards(["rm:someone/not-cached"])


def test_what_is_not_a_one_label_classifier_is_refused(tiny_model, tmp_path):
    with pytest.raises(UserError, match="is a LlamaForCausalLM, not a sequence classifier"):
        load_rewards([f"rm:{tiny_model}"])
    two = save_classifier(tiny_model, tmp_path / "two", num_labels=2)
    with pytest.raises(UserError, match="has 2 labels; a reward is one number"):
        load_rewards([f"rm:{two}"])
    with pytest.raises(UserError, match="train it first"):  # ours, not trained yet: as before
        load_rewards([f"rm:{tmp_path}/run/reward_model"])
