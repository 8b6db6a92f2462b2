"""push_to_hub / ``rlhf push``: what would be uploaded, checked against a fake Hub (HfApi's
create_repo and upload_folder replaced: nothing leaves this machine)."""
import json
from pathlib import Path


from rlhf.cli import main

TINY = ["steps=2", "prompts_per_step=2", "group_size=2", "max_new_tokens=4", "lora_r=2", "lora_alpha=4",
        "threads=1", "log_completions_every=0"]


class FakeHub:
    """Records each call; ``upload_folder`` lists the folder's files (and their bytes) at call time."""

    def __init__(self, monkeypatch, fail: Exception | None = None):
        from huggingface_hub import HfApi

        self.repos, self.uploads, self.fail = [], [], fail
        monkeypatch.setattr(HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", self.upload_folder)

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False, **kw):
        if self.fail is not None:
            raise self.fail
        self.repos.append({"repo_id": repo_id, "repo_type": repo_type, "private": private, "exist_ok": exist_ok})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None, **kw):
        root = Path(folder_path)
        files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        self.uploads.append({"repo_id": repo_id, "repo_type": repo_type, "files": files, "message": commit_message})
        return type("CommitInfo", (), {"oid": "c0ffee"})()


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), err


def sets(*items):
    return [x for item in items for x in ("--set", item)]


def test_a_run_with_push_to_hub_uploads_its_adapter_and_rlhf_push_does_it_again(tiny_model, tmp_path, capsys,
                                                                               monkeypatch):
    hub = FakeHub(monkeypatch)
    run = tmp_path / "run"
    code, result, err = run_cli(capsys, "train", "grpo_arith", "--no-progress", "--run-dir", str(run),
                                *sets(f"model={tiny_model}", *TINY, "push_to_hub=me/arith-grpo"))
    assert code == 0, err
    assert result["hub"] == {"repo": "me/arith-grpo", "url": "https://huggingface.co/me/arith-grpo", "commit": "c0ffee"}
    assert hub.repos == [{"repo_id": "me/arith-grpo", "repo_type": "model", "private": False, "exist_ok": True}]
    (upload,) = hub.uploads
    adapter = run / "adapter"
    # exactly the run's adapter directory, byte for byte: weights, config, tokenizer, model card
    assert upload["files"] == {str(p.relative_to(adapter)): p.read_bytes() for p in adapter.rglob("*") if p.is_file()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= set(upload["files"])
    assert upload["repo_id"] == "me/arith-grpo" and upload["repo_type"] == "model"

    code, pushed, err = run_cli(capsys, "push", str(run), "me/other", "--private")
    assert code == 0, err
    assert pushed["repo"] == "me/other" and hub.repos[-1]["private"] is True
    assert hub.uploads[-1]["files"] == upload["files"]


def test_a_failed_push_is_one_sentence_and_keeps_the_run(tiny_model, tmp_path, capsys, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    FakeHub(monkeypatch, fail=OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."))
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "grpo_arith", "--no-progress", "--run-dir", str(run),
                           *sets(f"model={tiny_model}", *TINY, "push_to_hub=me/arith-grpo"))
    assert code == 2 and err.splitlines()[0] == f"run directory: {run}" and len(err.splitlines()) == 2
    err = err.splitlines()[1]  # one sentence
    assert "OfflineModeIsEnabled" in err and "the run is kept" in err and f"rlhf push {run} me/arith-grpo" in err
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "metrics.jsonl").is_file()


def test_bad_push_settings_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    hub = FakeHub(monkeypatch)
    code, _, err = run_cli(capsys, "train", "grpo_arith", "--run-dir", str(tmp_path / "a"), *sets("push_to_hub=a/b/c"))
    assert code == 2 and "push_to_hub 'a/b/c' is not a Hub repo id" in err and not (tmp_path / "a").exists()
    code, _, err = run_cli(capsys, "train", "rm_arith", "--run-dir", str(tmp_path / "b"), *sets("push_to_hub=me/rm"))
    assert code == 2 and "reward_model run has none" in err
    code, _, err = run_cli(capsys, "push", str(tmp_path), "me/x")
    assert code == 2 and "has no trained adapter" in err
    assert hub.repos == [] and hub.uploads == []
