"""`kdistill generate` prompted with the beginnings of a run recipe's training documents
(`prompts: {name: documents}`): sequence-level KD on a corpus, never a held-out document, and
a resumed file that answered other prompts is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdistill.config.generate import load_generate_config
from kdistill.errors import ConfigError
from kdistill.pipeline.generate import run_generate
from tests.test_generate import teacher_dir  # noqa: F401 - fixture


def _documents_recipe(tmp_path: Path) -> Path:
    """A run recipe over text files whose test file holds a word no training document has."""
    train = tmp_path / "train.txt"
    words = " ".join(f"w{j}" for j in range(20))
    train.write_text("\n\n".join([f"doc {i}:  {words}\n  and more" for i in range(30)]
                                  + ["too short to prompt with"]))
    (tmp_path / "test.txt").write_text(f"zzsecret {words}\n\nzzsecret again {words}")
    recipe = tmp_path / "run.yaml"
    recipe.write_text(f"data: {{name: text_files, path: {train}, test_path: "
                      f"{tmp_path / 'test.txt'}, val_size: 3, tokenizer: smollm2}}\n"
                      "student: {model: {arch: llama}}\nmethod: {name: token_kd}\n")
    return recipe


def test_document_prompts_are_beginnings_of_training_documents(tmp_path: Path) -> None:
    from kdistill.config import load_config

    recipe = _documents_recipe(tmp_path)
    gen = tmp_path / "gen.yaml"
    gen.write_text(f"prompts: {{name: documents, recipe: {recipe}, prefix_words: 5}}\n"
                   f"output: {{path: {tmp_path / 'out.jsonl'}}}\nprompt_format: text\n")
    prompts = load_generate_config(str(gen)).prompts.load()
    train = load_config(str(recipe)).data.training_documents()
    assert len(train) == 28 and len(prompts) == 27  # 3 validation; the short one skipped
    for p in prompts:
        doc = train[int(p.id.removeprefix("doc"))]
        assert isinstance(p.prompt, str) and doc.startswith(p.prompt) and len(doc) > len(p.prompt)
        assert len(p.prompt.split()) == 5 and p.prompt.endswith("w2")  # "doc i:" is two words
        assert "zzsecret" not in p.prompt
    ten = load_generate_config(str(gen), ["prompts.limit=10"]).prompts.load()
    assert ten == prompts[:10]  # a larger limit with the same seed extends a smaller one
    assert load_generate_config(str(gen), ["prompts.seed=1"]).prompts.load() != prompts


@pytest.mark.parametrize(("tree", "message"), [
    ("prompts: {name: documents}", "give the recipe's path"),
    ("prompts: {name: stdlib_functions, recipe: r.yaml}", "only with name: documents"),
    ("prompts: {name: fortunes, prefix_words: 4}", "prefix_words: only with name: documents"),
    ("prompts: {name: documents, recipe: r.yaml}", "set prompt_format: text"),
])
def test_document_prompt_settings_are_checked(tmp_path: Path, tree: str, message: str) -> None:
    gen = tmp_path / "gen.yaml"
    gen.write_text(f"{tree}\noutput: {{path: {tmp_path / 'o.jsonl'}}}\n")
    with pytest.raises(ConfigError, match=message):
        load_generate_config(str(gen))


def test_document_prompts_need_a_source_with_documents(tmp_path: Path) -> None:
    recipe = tmp_path / "run.yaml"
    recipe.write_text("data: {name: mnist1d}\nstudent: {model: {arch: mlp}}\n")
    gen = tmp_path / "gen.yaml"
    gen.write_text(f"prompts: {{name: documents, recipe: {recipe}}}\nprompt_format: text\n"
                   f"output: {{path: {tmp_path / 'o.jsonl'}}}\n")
    with pytest.raises(ConfigError, match="no documents to prompt with") as err:
        load_generate_config(str(gen)).prompts.load()
    assert err.value.where == "prompts.recipe"


def test_a_resumed_file_must_have_answered_the_same_prompts(teacher_dir: str,  # noqa: F811
                                                            tmp_path: Path) -> None:
    recipe = _documents_recipe(tmp_path)
    gen = tmp_path / "gen.yaml"
    gen.write_text(f"teacher: {{path: {teacher_dir}}}\n"
                   f"prompts: {{name: documents, recipe: {recipe}, prefix_words: 5, limit: 3}}\n"
                   f"output: {{path: {tmp_path / 'out.jsonl'}}}\nprompt_format: text\n"
                   "sampling: {max_new_tokens: 2}\nbatch_size: 2\n")
    assert run_generate(load_generate_config(str(gen))).n_generated == 3
    again = run_generate(load_generate_config(str(gen), ["prompts.limit=4"]))
    assert again.n_generated == 1  # the same prompts found done, one more answered
    # Other prefixes under the same ids (doc<i>): refused, not taken as done.
    with pytest.raises(ConfigError, match=r"answered prompt 'doc\d+' for another prompt text"):
        run_generate(load_generate_config(str(gen), ["prompts.prefix_words=6"]))
