"""launcher.models.builtin: built-in models on the shapes launcher.data produces, user factories, bad --model."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from launcher.errors import UsageError
from launcher.models.builtin import MODEL_NAMES, build_model


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("mlp", (1, 8, 8)),
        ("mlp", (7,)),
        ("cnn", (1, 8, 8)),
        ("cnn", (3, 9, 13)),
        ("cnn", (3, 32, 32)),
        ("resnet", (1, 8, 8)),
        ("resnet", (3, 32, 32)),
    ],
)
def test_builtin_models_train_on_their_shapes(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 5)
    x, y = torch.randn(4, *shape), torch.tensor([0, 1, 2, 4])
    logits = model(x)
    assert logits.shape == (4, 5)
    nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_names_are_all_buildable():
    for name in MODEL_NAMES:
        assert isinstance(build_model(name, (3, 8, 8), 2), nn.Module)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_weights(name):
    torch.manual_seed(1)
    a = build_model(name, (1, 8, 8), 10).state_dict()
    torch.manual_seed(1)
    b = build_model(name, (1, 8, 8), 10).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_dropout_draws_from_the_torch_rng(name):
    """Training-mode outputs depend on the RNG stream, so a bit-exact resume must restore it.

    (The resnet, like the published ResNet-20, has no dropout: only batch-norm statistics as extra state.)
    """
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 10)
    x = torch.randn(6, 1, 8, 8)
    model.train()
    torch.manual_seed(2)
    first = model(x)
    torch.manual_seed(2)
    again = model(x)
    assert torch.equal(first, again) and not torch.equal(first, model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module file in a folder that becomes the working directory, as a user's project would be."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    names = []

    def write(name, source):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return tmp_path / f"{name}.py"

    yield write
    for name in names:
        sys.modules.pop(name, None)


FACTORIES = """
    import torch
    from torch import nn

    def build(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))

    def build_kw(*, input_shape, num_classes, width=3):
        return nn.Linear(input_shape[0], num_classes)

    def wrong_signature(shape, classes):
        return nn.Identity()

    def not_a_module(input_shape, num_classes):
        return "a string"

    NOT_CALLABLE = 3
"""


def test_factory_from_the_working_directory(user_module):
    user_module("my_models_a", FACTORIES)
    model = build_model("my_models_a:build", (1, 4, 4), 3)
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 3)
    assert isinstance(build_model("my_models_a:build_kw", (6,), 2), nn.Linear)


def test_factory_from_a_file_path(user_module):
    path = user_module("my_models_b", FACTORIES)
    model = build_model(f"{path}:build", (5,), 4)
    assert model(torch.randn(2, 5)).shape == (2, 4)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("transformer", "unknown model 'transformer': use one of mlp, cnn, resnet or 'module.path:factory'"),
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
        ("no_such_pkg_xyz.sub:build", "cannot import module 'no_such_pkg_xyz.sub'"),
        ("missing.py:build", "file 'missing.py' does not exist"),
        (":build", "write it as 'module.path:factory'"),
        ("my_models_c:", "write it as 'module.path:factory'"),
        ("my_models_c:nothing", "module 'my_models_c' has no attribute 'nothing'"),
        ("my_models_c:NOT_CALLABLE", "is not callable"),
        ("my_models_c:wrong_signature", "must accept the keyword arguments input_shape and num_classes"),
        ("my_models_c:not_a_module", "returned str, not a torch.nn.Module"),
    ],
)
def test_bad_model_specs(user_module, spec, expected):
    user_module("my_models_c", FACTORIES)
    with pytest.raises(UsageError) as error:
        build_model(spec, (1, 8, 8), 10)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_missing_dependency_inside_a_user_module_keeps_its_traceback(user_module):
    user_module("my_models_d", "import no_such_dependency_xyz\n")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        build_model("my_models_d:build", (1, 8, 8), 10)


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("cnn", (12,), "needs image inputs (C, H, W)"),
        ("resnet", (12,), "use --model mlp for tabular data"),
        ("cnn", (1, 4, 8), "at least 8x8"),
        ("resnet", (3, 7, 7), "at least 8x8"),
    ],
)
def test_conv_models_refuse_unsuitable_inputs(name, shape, expected):
    with pytest.raises(UsageError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        build_model(name, shape, 10)
