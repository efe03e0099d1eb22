"""data.manifest: CSV manifests per task, every bad-CSV case, folder scans and MSD datalists."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from core.errors import ConfigError, ManifestError
from data.manifest import (STANDARD_COLUMNS, check_not_image_paths, clinical_columns, image_path_columns, read_any,
                           read_datalist, read_manifest, scan_folder)
from models.tasks import CLASSIFICATION, MULTITASK, SURVIVAL


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def csv(tmp_path, text, name="manifest.csv", make_files=True):
    """Write a manifest; create every image/mask file it names (relative to its folder)."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if make_files:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        for col in ("image", "mask"):
            for p in df.get(col, []):
                if p:
                    touch(tmp_path / p)
    return path


def assert_error(match, fn, *args, error=ManifestError, **kwargs):
    with pytest.raises(error, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


GOOD = """subject_id,image,mask,label,age,sex,time,event
007,img/007.nii.gz,seg/007.nii.gz,1,61,F,12.5,1
NA,img/na.nii.gz,seg/na.nii.gz,0,,M,30,0
s3,img/s3.nii.gz,seg/s3.nii.gz,1,70,M,4,1
"""


def test_classification_happy_path(tmp_path):
    df = CLASSIFICATION.read_manifest(csv(tmp_path, GOOD))
    assert list(df["subject_id"]) == ["007", "NA", "s3"]  # ids stay exact strings
    assert list(df["patient_id"]) == list(df["subject_id"])
    assert set(df["site"]) == {"site0"}
    assert df["image"].iloc[0] == str(tmp_path / "img" / "007.nii.gz")
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in list(df["image"]) + list(df["mask"]))
    assert df["label"].dtype == np.int64 and list(df["label"]) == [1, 0, 1]
    assert list(df.columns[:5]) == ["subject_id", "patient_id", "site", "image", "mask"]
    # Clinical columns are pandas' own parse of the file, untouched (missing age stays NaN).
    reference = pd.read_csv(tmp_path / "manifest.csv")
    pd.testing.assert_series_equal(df["age"], reference["age"])
    pd.testing.assert_series_equal(df["sex"], reference["sex"])
    assert clinical_columns(df) == ["age", "sex"]


def test_survival_and_multitask_dtypes(tmp_path):
    path = csv(tmp_path, GOOD)
    for task in (SURVIVAL, MULTITASK):
        df = task.read_manifest(path)
        assert df["time"].dtype == np.float64 and list(df["time"]) == [12.5, 30.0, 4.0]
        assert df["event"].dtype == np.int64 and list(df["event"]) == [1, 0, 1]


def test_explicit_patient_and_site_are_kept_as_strings(tmp_path):
    text = "subject_id,patient_id,site,image,mask\na1,0042,01,a1.nii,m1.nii\na2,0042,02,a2.nii,\n"
    df = read_manifest(csv(tmp_path, text), columns=("image",))
    assert list(df["patient_id"]) == ["0042", "0042"] and list(df["site"]) == ["01", "02"]
    # An optional mask column is resolved too; a blank stays missing.
    assert df["mask"].iloc[0] == str(tmp_path / "m1.nii") and pd.isna(df["mask"].iloc[1])
    assert clinical_columns(df) == []


def test_absolute_paths_are_kept(tmp_path):
    image = touch(tmp_path / "elsewhere" / "x.nii.gz")
    path = csv(tmp_path, f"subject_id,image\nx,{image}\n", name="sub/m.csv", make_files=False)
    assert read_manifest(path, columns=("image",))["image"].iloc[0] == str(image)


def test_unknown_column(tmp_path):
    assert_error(r"\['segmentation'\] are not standard columns", read_manifest, csv(tmp_path, GOOD),
                 columns=("image", "segmentation"), error=ConfigError)


def test_missing_manifest_file(tmp_path):
    assert_error(r"manifest .*none\.csv: file not found", read_manifest, tmp_path / "none.csv")


def test_empty_file_and_header_only(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    assert_error(r"empty\.csv: file is empty", read_manifest, tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("subject_id,image,mask,label\n")
    assert_error(r"header\.csv: no data rows", read_manifest, tmp_path / "header.csv")


def test_unparseable_csv(tmp_path):
    path = csv(tmp_path, "subject_id,image\ns1,a.nii\ns2,b.nii,extra,fields\n", make_files=False)
    assert_error(r"manifest\.csv: cannot parse CSV", read_manifest, path, columns=("image",))


def test_missing_columns_are_listed_with_the_task(tmp_path):
    path = csv(tmp_path, "subject_id,image,age\ns1,a.nii,3\n")
    assert_error(r"missing column\(s\) \['mask', 'label'\] required for --task classification",
                 CLASSIFICATION.read_manifest, path)
    assert_error(r"missing column\(s\) \['mask', 'time', 'event'\] required for --task survival",
                 SURVIVAL.read_manifest, path)
    assert len(read_manifest(path, columns=("image",))) == 1


def test_rows_longer_than_the_header_are_an_error_not_a_shifted_index(tmp_path):
    # pandas alone would turn subject_id into the index and shift every column left.
    path = csv(tmp_path, "subject_id,image\ns1,a.nii,x\ns2,b.nii,y\n", make_files=False)
    assert_error(r"manifest\.csv: cannot parse CSV", read_manifest, path, columns=("image",))


def test_header_names_are_stripped_and_duplicates_rejected(tmp_path):
    path = csv(tmp_path, "subject_id , image,label \ns1,a.nii,1\n")
    df = read_manifest(path, columns=("image",), check_files=False)
    assert list(df.columns) == ["subject_id", "patient_id", "site", "image", "label"]
    for header in ("age,age", "age,age "):
        path = csv(tmp_path, f"subject_id,image,{header}\ns1,a.nii,3,4\n")
        assert_error(r"duplicate column name\(s\) \['age'\]", read_manifest, path, columns=("image",))


def test_duplicate_subject_ids_are_listed(tmp_path):
    text = "subject_id,image\ns1,a.nii\ns2,b.nii\ns1,c.nii\ns2,d.nii\ns3,e.nii\n"
    assert_error(r"duplicate subject_id\(s\) s1, s2$", read_manifest, csv(tmp_path, text), columns=("image",))


def test_missing_files_list_first_five_and_count_the_rest(tmp_path):
    rows = "".join(f"s{i},img{i}.nii.gz,seg{i}.nii.gz,1\n" for i in range(7))
    path = csv(tmp_path, "subject_id,image,mask,label\n" + rows, make_files=False)
    for i in range(7):
        touch(tmp_path / f"img{i}.nii.gz")
    (tmp_path / "seg3.nii.gz").unlink(missing_ok=True)
    msg = assert_error(r"7 missing file\(s\): s0 mask .*seg0\.nii\.gz, .* and 2 more$", read_manifest, path)
    assert "s4 mask" in msg and "s5 mask" not in msg
    assert len(read_manifest(path, check_files=False)) == 7


def test_empty_subject_id_names_the_row(tmp_path):
    path = csv(tmp_path, "subject_id,image\ns1,a.nii\n,b.nii\n")
    assert_error(r"empty subject_id in row 2$", read_manifest, path, columns=("image",))


def test_empty_image_names_the_row_and_subject(tmp_path):
    path = csv(tmp_path, "subject_id,image,mask,label\ns1,a.nii,m.nii,0\ns2,,m.nii,1\n")
    assert_error(r"empty image in row 2 \(subject s2\)$", read_manifest, path)


def test_bad_labels_list_rows_and_values(tmp_path):
    text = ("subject_id,image,mask,label\ns1,a.nii,m.nii,1\ns2,a.nii,m.nii,2\n"
            "s3,a.nii,m.nii,TP\ns4,a.nii,m.nii,\ns5,a.nii,m.nii,0\n")
    assert_error(r"label must be 0 or 1 .*; bad row 2 \(subject s2\): 2, row 3 \(subject s3\): TP, "
                 r"row 4 \(subject s4\): \(empty\)$", CLASSIFICATION.read_manifest, csv(tmp_path, text))


@pytest.mark.parametrize("value", ["abc", "0", "-3", "", "inf"])
def test_bad_times_list_rows_and_values(tmp_path, value):
    text = f"subject_id,image,mask,time,event\ns1,a.nii,m.nii,5,1\ns2,a.nii,m.nii,{value},0\n"
    shown = value or r"\(empty\)"
    assert_error(rf"time must be a number > 0; bad row 2 \(subject s2\): {shown}$",
                 read_manifest, csv(tmp_path, text), columns=SURVIVAL.manifest_columns)


def test_bad_events_list_rows_and_values(tmp_path):
    text = "subject_id,image,mask,label,time,event\ns1,a.nii,m.nii,1,5,yes\ns2,a.nii,m.nii,0,5,0.5\n"
    assert_error(r"event must be 0 \(censored\) or 1 \(event\); bad row 1 \(subject s1\): yes, row 2 \(subject s2\): 0\.5$",
                 read_manifest, csv(tmp_path, text), columns=MULTITASK.manifest_columns)


def test_scan_folder_is_sorted_absolute_and_skips_hidden_and_other_files(tmp_path):
    for rel in ["b/scan.nii.gz", "a.nii", "b/a.nii.gz", "notes.txt", "._a.nii", ".cache/x.nii.gz"]:
        touch(tmp_path / rel)
    df = scan_folder(tmp_path)
    assert list(df.columns) == ["subject_id", "patient_id", "site", "image"]
    assert list(df["subject_id"]) == ["a", "b/a", "b/scan"]
    assert list(df["patient_id"]) == ["a", "b/a", "b/scan"]
    assert list(df["image"]) == [str(tmp_path / r) for r in ["a.nii", "b/a.nii.gz", "b/scan.nii.gz"]]
    pd.testing.assert_frame_equal(df, scan_folder(tmp_path))


def test_scan_folder_errors(tmp_path):
    assert_error(r"no \.nii/\.nii\.gz files match", scan_folder, tmp_path)
    assert_error(r"not a directory", scan_folder, tmp_path / "missing")
    touch(tmp_path / "x.nii")
    touch(tmp_path / "x.nii.gz")
    assert_error(r"duplicate subject_id\(s\) x$", scan_folder, tmp_path)


def test_msd_datalist_label_path_becomes_mask(tmp_path):
    doc = {"training": [{"image": "./imagesTr/c2.nii.gz", "label": "./labelsTr/c2.nii.gz"},
                        {"image": "./imagesTr/c1.nii.gz", "label": "./labelsTr/c1.nii.gz"}],
           "test": ["./imagesTs/t1.nii.gz"]}
    for entry in doc["training"]:
        touch(tmp_path / entry["image"])
        touch(tmp_path / entry["label"])
    touch(tmp_path / "imagesTs/t1.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    df = read_datalist(tmp_path / "dataset.json")
    assert list(df["subject_id"]) == ["c2", "c1"]
    assert list(df["mask"]) == [str(tmp_path / "labelsTr" / "c2.nii.gz"), str(tmp_path / "labelsTr" / "c1.nii.gz")]
    assert "label" not in df.columns and set(df["site"]) == {"site0"}
    test = read_datalist(tmp_path / "dataset.json", key="test")
    assert list(test["image"]) == [str(tmp_path / "imagesTs" / "t1.nii.gz")]
    assert_error(r"dataset\.json: no key 'validation'; found \['test', 'training'\]",
                 read_datalist, tmp_path / "dataset.json", key="validation")


def test_datalist_base_dir_numeric_labels_and_same_names(tmp_path):
    for rel in ["data/A/scan.nii.gz", "data/B/scan.nii.gz"]:
        touch(tmp_path / rel)
    doc = {"base_dir": "data", "training": [{"image": "A/scan.nii.gz", "label": 1, "age": 50},
                                            {"image": "B/scan.nii.gz", "label": 0, "age": 61}]}
    (tmp_path / "list.json").write_text(json.dumps(doc))
    df = read_datalist(tmp_path / "list.json")
    assert list(df["subject_id"]) == ["A/scan", "B/scan"]  # same file name: folders disambiguate
    assert list(df["label"]) == [1, 0] and clinical_columns(df) == ["age"]
    assert df["image"].iloc[1] == str(tmp_path / "data" / "B" / "scan.nii.gz")


def test_datalist_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    assert_error(r"bad\.json: cannot parse JSON", read_datalist, tmp_path / "bad.json")
    (tmp_path / "noimg.json").write_text(json.dumps({"training": [{"label": "x.nii.gz"}]}))
    assert_error(r"noimg\.json: training\[0\] must be a path or an object", read_datalist, tmp_path / "noimg.json")
    (tmp_path / "nomask.json").write_text(json.dumps({"training": [{"image": "x.nii.gz", "mask": None}]}))
    assert_error(r"nomask\.json: training\[0\] mask/label must be a path", read_datalist, tmp_path / "nomask.json")
    (tmp_path / "gone.json").write_text(json.dumps({"training": ["gone.nii.gz"]}))
    assert_error(r"gone\.json: 1 missing file\(s\): gone image", read_datalist, tmp_path / "gone.json")


def test_read_any_dispatches_on_folder_csv_and_json(tmp_path):
    touch(tmp_path / "vols" / "v1.nii.gz")
    assert list(read_any(tmp_path / "vols")["subject_id"]) == ["v1"]
    assert list(read_any(csv(tmp_path, "subject_id,image\np1,vols/v1.nii.gz\n"))["subject_id"]) == ["p1"]
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": "vols/v1.nii.gz"}]}))
    assert list(read_any(tmp_path / "d.json")["subject_id"]) == ["v1"]
    touch(tmp_path / "list.txt")
    assert_error(r"list\.txt: expected a folder of NIfTIs", read_any, tmp_path / "list.txt")
    assert_error(r"missing: no such file or folder", read_any, tmp_path / "missing")


def test_clinical_columns_keep_file_order():
    df = pd.DataFrame(columns=["zeta", "subject_id", "alpha", "image", "kps", "time"])
    assert clinical_columns(df) == ["zeta", "alpha", "kps"]
    assert not set(clinical_columns(pd.DataFrame(columns=list(STANDARD_COLUMNS))))


def test_a_column_of_image_paths_is_never_clinical():
    """A sequence the run does not read (flair) is an image column, not a clinical one; a column that only partly
    holds NIfTI names, or holds other text, stays clinical."""
    df = pd.DataFrame({"subject_id": ["a", "b", "c"], "image": ["a.nii.gz"] * 3,
                       "flair": ["f/a.nii.gz", "", "f/C.NII"],  # one missing, one upper-case suffix
                       "note": ["x.nii.gz", "seen twice", None], "age": [60, 61, 62], "sex": ["M", "F", "M"],
                       "empty": [None, None, None]})
    assert image_path_columns(df) == ["image", "flair"]
    assert clinical_columns(df) == ["note", "age", "sex", "empty"]
    check_not_image_paths(df, ["age", "age", "note"], "--clinical_columns")  # a name given twice: no crash
    assert_error(r"^--clinical_columns: column\(s\) \['flair'\] hold image paths, not clinical values; read them as "
                 r"images with --images \(e\.g\. --images image,flair\)$", check_not_image_paths, df,
                 ["flair", "flair", "age"], "--clinical_columns")


def test_an_optional_brain_mask_column_is_a_path_checked_where_given_and_never_clinical(tmp_path):
    text = "subject_id,image,mask,brain_mask,age\ns1,s1.nii.gz,s1_m.nii.gz,brain/s1.nii.gz,60\ns2,s2.nii.gz,s2_m.nii.gz,,70\n"
    path = csv(tmp_path, text)
    assert_error(r"1 missing file\(s\): s1 brain_mask .*brain/s1\.nii\.gz$", read_manifest, path)
    touch(tmp_path / "brain" / "s1.nii.gz")
    df = read_manifest(path)
    assert df["brain_mask"].iloc[0] == str(tmp_path / "brain" / "s1.nii.gz") and pd.isna(df["brain_mask"].iloc[1])
    assert clinical_columns(df) == ["age"]
