"""Device selection: CPU works here; GPU devices are assembled up to the point onnxruntime-gpu would take over."""

import onnxruntime as ort
import pytest

from zoomin.runtime.providers import DeviceError, providers_for


def test_cpu_provider():
    assert providers_for("cpu") == ["CPUExecutionProvider"]


def test_unknown_device_is_a_clear_error():
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        providers_for("tpu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="GPU build present")
@pytest.mark.parametrize("device", ["cuda", "tensorrt", "jetson"])
def test_gpu_devices_need_onnxruntime_gpu(device):
    with pytest.raises(DeviceError, match="onnxruntime-gpu"):
        providers_for(device)


def test_tensorrt_provider_chain(monkeypatch, tmp_path):
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    chain = providers_for("tensorrt", cache_dir=tmp_path)
    assert [p[0] if isinstance(p, tuple) else p for p in chain] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = chain[0][1]
    assert trt["trt_engine_cache_enable"] and trt["trt_engine_cache_path"] == str(tmp_path)
    assert "trt_max_workspace_size" in providers_for("jetson", cache_dir=tmp_path)[0][1]


def test_cuda_without_tensorrt(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers_for("cuda")[0][0] == "CUDAExecutionProvider"
    with pytest.raises(DeviceError, match="TensorRT"):
        providers_for("tensorrt")
