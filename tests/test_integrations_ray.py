"""ttakit.integrations.ray: TTAPredictor in Ray Data actors and ``predict --engine ray`` on a
local Ray with 2 CPUs, against one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ttakit.aliases import get_policy
from ttakit.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from ttakit.engine import TTAEngine
from ttakit.errors import InvalidInputError
from ttakit.integrations.ray import TTAPredictor
from ttakit.models import CheckpointMeta, create_model, save_checkpoint
from ttakit.predictors import load

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("seed-cnn", in_channels=1, num_classes=10, image_size=(28, 28), mean=[0.286], std=[0.353])
    meta = CheckpointMeta(arch="seed-cnn", classes=list(FASHION_MNIST_CLASSES), in_channels=1, image_size=[28, 28],
                          mean=[0.286], std=[0.353])
    return save_checkpoint(tmp_path_factory.mktemp("ray") / "run", model, meta)


@pytest.fixture(scope="module")
def pixels():
    """500 Fashion-MNIST test images as (N, 28, 28) uint8."""
    return (load_fashion_mnist("test").images[:500, 0] * 255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray-session")))
    yield ray
    ray.shutdown()


def test_predictor_columns_equal_the_engine(checkpoint, pixels):
    predict = TTAPredictor(checkpoint, "hflip", top_k=3)
    out = predict({"image": pixels[:20], "row": np.arange(20)})
    reference = TTAEngine(load(checkpoint), get_policy("hflip")).run(torch.from_numpy(pixels[:20, None]).float() / 255)
    assert out["probs"] == pytest.approx(reference.merged.numpy(), abs=1e-6)
    assert out["top_k_classes"].shape == (20, 3) and list(out["row"]) == list(range(20))
    top = reference.merged.argmax(1).tolist()
    assert [row[0] for row in out["top_k_classes"]] == [FASHION_MNIST_CLASSES[c] for c in top]
    assert np.allclose(out["top_k_probs"][:, 0], out["probs"].max(1))
    assert (out["forward_passes"] == 2).all() and out["entropy"].shape == (20,)


def test_predictor_refuses_a_missing_column(checkpoint, pixels):
    with pytest.raises(InvalidInputError, match="no column 'image'.*pixels"):
        TTAPredictor(checkpoint)({"pixels": pixels[:2]})


@pytest.mark.slow
def test_ray_data_map_batches_equals_one_process(local_ray, checkpoint, pixels):
    ray = local_ray
    ds = ray.data.from_items([{"index": i, "image": pixels[i]} for i in range(len(pixels))])
    out = ds.map_batches(TTAPredictor, fn_constructor_kwargs={"model_source": str(checkpoint), "policy": "hflip"},
                         batch_size=64, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1).take_all()
    assert sorted(row["index"] for row in out) == list(range(500))  # every image once, in any order
    probs = np.stack([row["probs"] for row in sorted(out, key=lambda row: row["index"])])
    reference = TTAEngine(load(checkpoint), get_policy("hflip")).run(torch.from_numpy(pixels[:, None]).float() / 255)
    assert probs == pytest.approx(reference.merged.numpy(), abs=1e-6)


@pytest.mark.slow
def test_predict_engine_ray_writes_the_bytes_of_one_process(local_ray, checkpoint, pixels, tmp_path):
    from ttakit.jobs.predict import predict_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(500):
        Image.fromarray(pixels[i], mode="L").save(folder / f"img{i:03d}.png")
    (folder / "img250.png").write_bytes(b"broken")
    one = predict_images(checkpoint, folder, out=tmp_path / "one.csv", policy="hflip", batch_size=64, workers=0,
                         progress=False)
    many = predict_images(checkpoint, folder, out=tmp_path / "ray.csv", policy="hflip", batch_size=64,
                          progress=False, engine="ray", ray_workers=2)
    assert many["n_predicted"] == one["n_predicted"] == 499 and many["n_errors"] == 1
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert (tmp_path / "ray.csv.errors.csv").read_bytes() == (tmp_path / "one.csv.errors.csv").read_bytes()


def test_engine_options_are_checked(checkpoint, tmp_path):
    from ttakit.jobs.predict import predict_images

    with pytest.raises(InvalidInputError, match="engine \\(--engine\\) must be 'local' or 'ray'"):
        predict_images(checkpoint, [tmp_path / "a.png"], out=tmp_path / "o.csv", engine="spark", progress=False)
    with pytest.raises(InvalidInputError, match="--ray-address and --ray-workers go with --engine ray"):
        predict_images(checkpoint, [tmp_path / "a.png"], out=tmp_path / "o.csv", ray_workers=2, progress=False)
    with pytest.raises(InvalidInputError, match="--engine ray predicts with one model"):
        predict_images([checkpoint, checkpoint], [tmp_path / "a.png"], out=tmp_path / "o.csv", engine="ray",
                       progress=False)


def test_a_missing_ray_says_how_to_install_it(monkeypatch):
    import sys

    from ttakit.integrations.ray import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(InvalidInputError, match='Ray Data is not installed; pip install "ttakit\\[ray\\]"'):
        require_ray()
