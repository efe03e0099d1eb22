"""The linear_clinical survival hazard, eta = beta . clinical + g(image): it ranks exactly as the clinical Cox
fit it starts from, and an image that carries nothing (pure noise, which a ViT memorises) costs nothing."""
import numpy as np
import pandas as pd
import pytest
import torch
from sksurv.metrics import concordance_index_censored

from core.errors import ClinicalError, ConfigError, InputError
from finetune.baselines.cox_init import clinical_cox_fit
from finetune.clinical import ClinicalSchema
from models.multimodal import MultimodalConfig, MultimodalModel
from models.tasks import get_task
from models.vit3d import ViT3DConfig

ENCODER = dict(in_channels=2, img_size=16, patch_size=8, dim=24, depth=1, heads=2)
COLUMNS = ["age", "kps", "grade"]


def toy_cohort(n: int, seed: int):
    """Clinical table with a known Cox hazard (ties from whole-unit times, 10% of ages missing) and pure-noise
    [image, mask] crops [n, 2, 16, 16, 16] that carry nothing about survival."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"age": rng.normal(60, 10, n), "kps": rng.choice([60, 70, 80, 90, 100], n).astype(float),
                       "grade": rng.choice(["II", "III", "IV"], n)})
    eta = 0.05 * (df.age - 60) - 0.03 * (df.kps - 80) + df.grade.map({"II": -0.6, "III": 0.0, "IV": 0.7})
    t, c = rng.exponential(1 / (0.1 * np.exp(eta))), rng.exponential(15, n)
    df["time"], df["event"] = np.round(np.minimum(t, c)) + 1.0, (t <= c).astype(int)
    df.loc[rng.random(n) < 0.1, "age"] = np.nan
    x = torch.randn(n, 2, 16, 16, 16, generator=torch.Generator().manual_seed(seed))  # [n, 2, S, S, S]
    x[:, 1] = (x[:, 1] > 1).float()
    return df, x


def harrell(df, risk) -> float:
    return concordance_index_censored(df["event"].to_numpy(bool), df["time"].to_numpy(), np.asarray(risk))[0]


@pytest.fixture(scope="module")
def cohort():
    train, x_train = toy_cohort(160, 0)
    test, x_test = toy_cohort(300, 1)
    schema = ClinicalSchema.fit(train, COLUMNS)
    cox = clinical_cox_fit(schema, train)
    z_train, z_test = (torch.from_numpy(schema.transform(d)) for d in (train, test))  # [n, F]
    return dict(train=train, test=test, x_train=x_train, x_test=x_test, z_train=z_train, z_test=z_test, cox=cox,
                cox_c=harrell(test, cox.predict(schema.transform(test).astype(float))))


def model_for(cohort, **kw) -> MultimodalModel:
    torch.manual_seed(0)
    kw = {"task": "survival", "fusion": "concat", **kw}
    cfg = MultimodalConfig(encoder=ViT3DConfig(**ENCODER), clinical_dim=cohort["z_train"].shape[1], **kw)
    return MultimodalModel(cfg)


@pytest.mark.parametrize("task, fusion", [("survival", "concat"), ("multitask", "film")])
def test_untrained_hazard_ranks_exactly_as_the_cox_fit(cohort, task, fusion):
    model = model_for(cohort, task=task, fusion=fusion)  # multitask: g also reads the label's logit
    model.set_clinical_hazard(cohort["cox"].coef_)
    model.eval()
    with torch.no_grad():
        out = model(cohort["x_test"], cohort["z_test"])
    assert not out["image_hazard"].any()  # g starts at zero
    assert harrell(cohort["test"], out["risk"]) == cohort["cox_c"]


def train_c(cohort, steps: int, **kw) -> float:
    """Harrell's C on the test cohort after `steps` full-batch AdamW steps from beta = 0 (not the Cox fit)."""
    model = model_for(cohort, **kw)
    opt = torch.optim.AdamW(model.param_groups(1e-2, 0.05))
    train = cohort["train"]
    batch = {"time": torch.tensor(train["time"].values), "event": torch.tensor(train["event"].values)}
    for _ in range(steps):
        out = model(cohort["x_train"], cohort["z_train"])
        loss = get_task("survival").loss(out, batch, hazard_l2=model.config.hazard_l2)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return harrell(cohort["test"], model(cohort["x_test"], cohort["z_test"])["risk"])


def test_noise_image_costs_nothing_with_the_linear_clinical_hazard(cohort):
    """Trained on noise crops, the default hazard ends within 0.01 of the clinical Cox model's test C; the deep
    head (the clinical vector inside the fused features) memorises the noise and falls far below it."""
    assert MultimodalConfig().survival_design == "linear_clinical"
    assert abs(train_c(cohort, 60) - cohort["cox_c"]) <= 0.01
    assert train_c(cohort, 60, survival_design="deep") < cohort["cox_c"] - 0.05


def test_lesion_volume_in_ml_from_the_mask_and_scale():
    cfg = MultimodalConfig(encoder=ViT3DConfig(**ENCODER), task="survival", fusion="none",
                           hazard_lesion_volume=True, voxel_mm=1.5)
    model = MultimodalModel(cfg)
    x = torch.zeros(2, 2, 16, 16, 16)
    x[0, 1, :4, :4, :4] = 1.0  # 64 crop voxels
    x[1, 1, :2, :2, :5] = 1.0  # 20 crop voxels
    scale = torch.tensor([2.0, 0.5])  # prepared voxels per crop voxel
    want = np.log(np.array([64 * (2 * 1.5) ** 3, 20 * (0.5 * 1.5) ** 3]) / 1000 + 1e-3)
    np.testing.assert_allclose(model.lesion_log_ml(x, scale).numpy(), want, rtol=1e-6)
    assert model(x, None, scale=scale)["risk"].shape == (2,)
    with pytest.raises(InputError, match="scale"):
        model(x, None)


def test_clinical_hazard_refuses_what_it_cannot_set(cohort):
    with pytest.raises(ClinicalError, match="coefficients"):
        model_for(cohort).set_clinical_hazard(np.zeros(2))
    with pytest.raises(ConfigError, match="linear clinical hazard"):
        model_for(cohort, survival_design="deep").set_clinical_hazard(cohort["cox"].coef_)
    with pytest.raises(ConfigError, match="hazard_lesion_volume"):
        MultimodalConfig(task="survival", fusion="clinical_only", hazard_lesion_volume=True)


def test_the_multitask_hazard_reads_the_logit_without_training_it(cohort):
    model = model_for(cohort, task="multitask").eval()  # no dropout: two passes compare
    assert model.surv_head.image.in_features == model.feature_dim + 1  # the fused features, then the logit
    torch.nn.init.normal_(model.surv_head.image.weight)
    x, z = cohort["x_test"][:4], cohort["z_test"][:4]
    risk = model(x, z)["risk"]
    risk.sum().backward()
    assert model.cls_head.weight.grad is None  # only BCE trains the label head
    with torch.no_grad():
        model.cls_head.bias += 1.0  # every logit up by 1: the risk moves by the logit's weight in g
        moved = model(x, z)["risk"] - risk
    torch.testing.assert_close(moved, model.surv_head.image.weight[0, -1].expand(4).detach(), rtol=1e-4, atol=1e-5)


def test_cox_fit_needs_events(cohort):
    schema = ClinicalSchema.fit(cohort["train"], COLUMNS)
    with pytest.raises(InputError, match="no events"):
        clinical_cox_fit(schema, cohort["train"].assign(event=0))
