"""Test tiers: `pytest -m "not slow" tests` is the fast tier (about a minute on 2 cores); plain
`pytest tests` (the README's command, and CI's) runs everything.

Slow: tests that use the module fixtures running real subprocess pipelines (`world`: the
bad-input corpus through every entry point; `demo`: train, infer, resume, torchrun), and the few
multi-step training tests named in SLOW."""
import pytest

SLOW_FIXTURES = {"world", "demo"}
SLOW = {"test_training_step_reduces_loss", "test_no_import_cycle_between_project_modules",
        "test_ctrl_c_with_a_worker_saves_and_a_rerun_resumes", "test_inference_stopped_by_a_signal",
        "test_training_stopped_by_a_signal"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: subprocess pipelines and multi-step training (left out of the fast tier)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or getattr(item, "originalname", "") in SLOW:
            item.add_marker(pytest.mark.slow)
