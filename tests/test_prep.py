"""Preparation: window with clip, body crop (largest component, table removed), resize/pad, stacking counts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dompre.data.prep import (PrepConfig, crop_body, crop_box, make_stacks, prepare_volume, resample_z,
                              resize_stacks, window_hu, window_hu_monai)


def test_window_maps_and_clips():
    hu = np.array([[[-2000.0, -1024.0, 1023.5, 3071.0, 5000.0]]], np.float32)
    out = window_hu(hu, (-1024, 3071))
    np.testing.assert_allclose(out.ravel(), [0, 0, 127.5, 255, 255], atol=1e-3)
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="high must exceed low"):
        window_hu(hu, (100, 100))
    rnd = np.random.default_rng(0).uniform(-3000, 4000, (3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(window_hu(rnd, (-160, 240)), window_hu_monai(rnd, (-160, 240)), atol=1e-3)


def body_with_table(z: int = 4) -> np.ndarray:
    hu = np.full((z, 40, 40), -1000.0, np.float32)
    hu[:, 8:28, 6:30] = 40.0          # body
    hu[:, 34:36, 2:38] = 300.0        # table under the body, not touching it
    hu[:, 2, 2] = 0.0                 # a speck of noise
    return hu


def test_crop_keeps_largest_component_plus_margin():
    hu = body_with_table()
    assert crop_box(hu, -500, 2) == (6, 30, 4, 32)
    out = crop_body(hu, -500, 2)
    assert out.shape == (4, 24, 28)
    assert (out > 200).sum() == 0     # table cut away
    # the margin stops at the image edge instead of padding
    assert crop_body(hu, -500, 50).shape == (4, 40, 40)


def test_crop_without_body_keeps_image():
    hu = np.full((2, 16, 16), -1000.0, np.float32)
    assert crop_body(hu).shape == (2, 16, 16)


def test_resize_and_keep_aspect_pad():
    x = np.full((2, 3, 20, 40), 200, np.uint8)
    out = resize_stacks(x, 32)
    assert out.shape == (2, 3, 32, 32) and out.dtype == np.uint8
    assert (out == 200).all()
    padded = resize_stacks(x, 32, keep_aspect=True)
    assert padded.shape == (2, 3, 32, 32)
    rows = padded[0, 1].max(axis=1)
    assert (rows == 0).sum() == 16 and (rows[8:24] == 200).all()  # 32x16 content centred, 0 above/below
    with pytest.raises(ValueError, match="uint8"):
        resize_stacks(x.astype(np.float32), 32)


def test_resize_is_antialiased_bilinear_on_float_reference():
    """The uint8 path agrees with float bilinear+antialias resizing within one grey level, and it averages:
    a one-pixel checkerboard (the worst case for aliasing) comes out as flat grey, not as stripes."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 3, 41, 57), dtype=np.uint8)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).float(), (32, 32), mode="bilinear", antialias=True)
    assert np.abs(resize_stacks(x, 32).astype(int) - np.rint(ref.numpy()).astype(int)).max() <= 1
    board = (np.indices((48, 48)).sum(0) % 2 * 255).astype(np.uint8)[None, None].repeat(3, 1)
    flat = resize_stacks(board, 32)
    assert abs(int(flat.mean()) - 127) <= 1 and flat.std() < 20


@pytest.mark.parametrize("z,stride,n,first_centers", [(10, 3, 3, [1, 4, 7]), (9, 3, 3, [1, 4, 7]),
                                                      (10, 1, 8, [1, 2, 3]), (10, 4, 2, [1, 5]), (2, 3, 0, [])])
def test_stack_counts(z, stride, n, first_centers):
    slices = np.arange(z, dtype=np.uint8)[:, None, None] * np.ones((1, 4, 4), np.uint8)
    stacks, center = make_stacks(slices, stride)
    assert stacks.shape == (n, 3, 4, 4)
    assert list(center[:3]) == first_centers
    for s, c in zip(stacks, center):
        assert list(s[:, 0, 0]) == [c - 1, c, c + 1]


def test_resample_z_linear():
    x = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    out, new_z = resample_z(x, np.array([0.0, 1, 2, 3, 4]) * 2.0, 3.0)
    np.testing.assert_allclose(new_z, [0, 3, 6])
    np.testing.assert_allclose(out[:, 0, 0], [0, 1.5, 3])


def test_prepare_volume_end_to_end():
    hu = body_with_table(z=11)
    stacks, zi = prepare_volume(hu, (2.0, 1.0, 1.0), PrepConfig(size=16, crop_margin=0))
    assert stacks.dtype == np.uint8 and stacks.shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(zi, [1, 4, 7])
    expected = np.rint((40 + 1024) / 4095 * 255)   # the crop holds only body: one uniform value
    assert (stacks == expected).all()
    stacks2, zi2 = prepare_volume(hu, (2.0, 1.0, 1.0), PrepConfig(size=16, slice_interval=4.0),
                                  z=np.arange(11) * 2.0)
    assert stacks2.shape[0] == 2          # 6 resampled slices, 4 mm apart
    np.testing.assert_allclose(zi2, [2.0, 8.0])
    s3, _ = prepare_volume(hu, (2.0, 1, 1), PrepConfig(size=16, window_source="series"), window=(0.0, 80.0))
    assert s3.max() == 128                       # 40 HU is the middle of the series' own window [0, 80]


def test_prep_config_rejects_bad_values():
    with pytest.raises(ValueError, match="window"):
        PrepConfig(window=(100.0, -100.0))
    with pytest.raises(ValueError, match="stride"):
        PrepConfig(stride=0)
    with pytest.raises(ValueError, match="slice_interval"):
        PrepConfig(slice_interval=0.0)


def test_prepare_from_stored_values_equals_prepare_from_hu():
    """The ingest path windows stored values with the per-slice rescale folded in (no float HU volume):
    same inputs as from HU, with per-slice slopes/intercepts that differ and a buffer that is reused."""
    rng = np.random.default_rng(0)
    hu = body_with_table(z=12)
    slope = np.where(np.arange(12) % 2, 0.5, 1.0).astype(np.float32)
    inter = np.where(np.arange(12) < 6, -1024.0, -1000.0).astype(np.float32)
    stored = np.rint((hu + rng.normal(0, 20, hu.shape) - inter[:, None, None]) / slope[:, None, None]).astype(np.int16)
    buf = np.zeros(10**6, np.uint8)
    alloc = lambda shape, dtype: buf[:int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)  # noqa: E731
    cfg = PrepConfig(size=16, crop_margin=1)
    for rescale_slope in (slope, np.full(12, 0.5, np.float32)):  # varying, then shared: two projection paths
        exact = stored * rescale_slope[:, None, None] + inter[:, None, None]
        ref, zi = prepare_volume(exact, (2.0, 1, 1), cfg)
        got, zi2 = prepare_volume(stored, (2.0, 1, 1), cfg, rescale=(rescale_slope, inter), alloc=alloc)
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(zi, zi2)


def test_one_volume_as_dicom_and_as_deeplesion_gives_identical_inputs(tmp_path):
    """ONE preparation: a phantom volume written as a DICOM series and as DeepLesion PNGs gives the same input
    at the same z (every lesion key slice of the DeepLesion copy against the DICOM stack centred on it)."""
    from dompre.data.deeplesion import LesionInputConfig, build_lesion_input, read_dl_info
    from dompre.data.dicom import read_series
    from dompre.synth.phantom import make_phantom, sample_patient
    from dompre.synth.cohort import generate_cohort
    from dompre.synth.dicom import write_dicom_series

    kw = dict(matrix=48, max_slices=40)
    generate_cohort(tmp_path / "dl", patients=1, seed=2, layout="deeplesion", lesions_per_patient=(4, 4),
                    progress=False, **kw)
    ph = make_phantom(sample_patient(np.random.default_rng([2, 0]), **kw), lesions_per_patient=(4, 4))
    write_dicom_series(tmp_path / "series", ph.hu, spacing=ph.spacing, patient_id="P", study_uid="1.2.3",
                       series_uid="1.2.3.4", origin=ph.origin)
    cfg = PrepConfig(size=32, stride=1)              # every slice is the middle of one DICOM input
    vol = read_series(tmp_path / "series")
    stacks, centre = prepare_volume(vol.stored, vol.spacing, cfg, rescale=(vol.slope, vol.intercept))
    info = read_dl_info(tmp_path / "dl" / "deeplesion" / "DL_info.csv")
    assert len(info) >= 2
    for idx in range(len(info)):
        item = build_lesion_input(tmp_path / "dl" / "deeplesion", info, idx, cfg=LesionInputConfig(prep=cfg))
        k = int(info["Key_slice_index"].iat[idx]) - 1  # 1-based file number -> volume index
        j = int(np.flatnonzero(centre == k)[0])
        np.testing.assert_array_equal(item.image, stacks[j])
        assert item.image.std() > 0                  # a real image, not two identical blanks
