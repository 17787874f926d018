"""Loading a checkpoint into a model (``models/loading.py``): any exported folder of a registered
family is rebuilt from its config.json alone, with the student's exact logits."""

import pytest
import torch

from tad_torchtune.models import init_student_from_teacher, pruned_student, save_hf_checkpoint
from tests.helpers.teachers import (
    CASES,
    SEQ,
    VOCAB,
    logits_of,
    teacher_node,
    teacher_via_checkpointer,
)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tad_eval_builds_every_family_from_config_json_alone(case, tmp_path):
    """An exported student of every family is rebuilt by ``tad_eval`` from its folder alone
    (the family read from config.json, its conversion loading the weights), with the
    student's exact logits."""
    from tad_torchtune.models import load_hf_folder

    teacher, teacher_dir = teacher_via_checkpointer(case, tmp_path)
    torch.manual_seed(0)
    student = pruned_student(teacher=teacher_node(case), num_layers=2, intermediate_dim=24,
                             mlp_init="copy")
    init_student_from_teacher(student, teacher)
    out = save_hf_checkpoint(student, tmp_path / "student", base_config=teacher_dir)
    model = load_hf_folder(out, where="students.s", device=torch.device("cpu"),
                           dtype=torch.float32)
    assert type(model.layers[0]) is type(student.layers[0])
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    ours, rebuilt = logits_of(student, tokens), logits_of(model, tokens)
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(rebuilt, ours, atol=1e-6, rtol=0)
