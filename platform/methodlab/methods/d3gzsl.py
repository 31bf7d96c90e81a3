"""D3GZSL: generative GZSL with in-distribution dual-space distillation (ID2SD) and
out-of-distribution batch distillation (O2DBD).

Wang, Hong, Huangfu, Huang, "Data Distribution Distilled Generative Model for Generalized Zero-Shot
Recognition", AAAI 2024, arXiv:2402.11424; official code github.com/PJBQ/D3GZSL (`gzsl/`, on the
f-CLSWGAN backbone of Xian et al., CVPR 2018, arXiv:1712.00981). The paper's equations were not
available; every formula here follows the official code (the project spec, part A).

This module is the adapter: it builds the networks (`methodlab.models.d3gzsl`: G, D, the teacher
trained in stage "teacher" and then frozen, the student, the learnable sigmoid), steps them with
the losses of `methodlab.losses.d3gzsl` (L_cls, ID2SD = label-space KL + embedding-space batch
BCE, O2DBD), scores them with `methodlab.metrics.gzsl` and exports the student.

Step order (one `train_step` = one generator iteration of the official code): the loop's batch is
split into `n_critic` critic minibatches (train.batch_size = n_critic x 256 reproduces the code's
256); each critic step updates D *and* the student and the sigmoid with L_D + L_aux; then one
generator step on the last minibatch updates G, the student and the sigmoid with L_G + L_aux. One
loop epoch (a pass over the data) is therefore 1/n_critic of an official epoch, which is
ceil(N/256) generator iterations; `lr_every` is counted in official epochs.

`loss_variant` (default `faithful`, the official code):
  faithful  L_kl is KL(softmax(p~) || softmax(q)) of already-softmaxed vectors (double softmax);
            L_be and L_od apply BCE-with-logits to similarities already in [0, 1], (cos + 1) / 2;
            L_od softmaxes the teacher confidence h~ again.
  clean     L_kl = T^2 KL(softmax(v~/T) || softmax(v^_S/T)) on logits; pair terms use logits
            kappa * cos; L_od compares softmax(h^) with h~ directly.

Protocols (`protocol`, default `validation`): GZSL code usually selects the best epoch on the
test set. Here `val_H` is the selection metric and the test split is never used for it.
  validation  the validation-unseen classes (xlsa17 val_loc classes) are treated as unseen: their
              training rows are dropped, G synthesises them, and val U measures them. Use it for
              sweeps.
  final       all trainval classes are seen (the literature's setting, comparable test numbers);
              val U then covers classes trained on real features and is only a sanity signal.

Evaluation: per-class mean accuracy with an argmax over all classes; S on rows of classes the
model saw, U on rows of unseen classes, H = 2SU / (S + U); ZSL (argmax over the unseen classes
only, on the unseen rows) is reported beside them. `eval_protocol` picks what the
headline S/U/H use: `end_to_end` (the student itself, the code's CUB default) or `fresh` (a new
linear classifier on frozen student embeddings of real seen + `syn_num` synthetic unseen features
per class, trained for `fresh_epochs`; its last epoch is kept, never a test-selected one). On
the test split the other protocol is reported too, as test_{e2e,fresh}_{S,U,H}.

Calibrated stacking (`calibration_gamma`; Chao et al., ECCV 2016, arXiv 1605.04253; not in the
official code, so the default 0 is the code): gamma is subtracted from the seen classes' scores
before the GZSL argmax (the paper's gamma is any real number: negative favours the seen
classes). `val` chooses it from `metrics.gzsl.GAMMA_GRID` by val H, for exactly the
networks being scored (also at test time); the chosen value is logged as {split}_gamma and the
uncalibrated scores as {split}_uncalibrated_{S,U,H}. Seen fidelity ({split}_seen_fidelity): the
frozen teacher, a classifier trained on real seen features only, on G's samples of the seen
classes; near chance, the generator reproduces nothing and its unseen samples mean nothing.

Baselines: `lambda_id = lambda_od = 0` is D3GZSL without distillation (the generator and the
end-to-end student, L_cls only). `variant=fclswgan` is the true f-CLSWGAN (Xian et al., CVPR 2018,
arXiv:1712.00981, official code `clswgan.py`): the same WGAN-GP, G's loss plus
`fclswgan_cls_weight` x the NLL of a classifier pretrained on real seen features (here the frozen
teacher: E_o + C_o, where f-CLSWGAN pretrains a linear softmax), no student, and a fresh softmax
Linear(d, C) on real seen + `syn_num` synthetic unseen features as the GZSL classifier.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from methodlab import distributed
from methodlab.config import Section
from methodlab.errors import ConfigError, DataError
from methodlab.losses.d3gzsl import (Variant, critic_terms, embedding_distillation, kl_distillation,
                                     ood_distillation, teacher_confidence)
from methodlab.methods.base import Method, SplitData, StepContext, freeze
from methodlab.metrics.gzsl import (best_gamma, calibrated, calibration_counts, class_counts, gzsl_counts, gzsl_scores,
                                    per_class_accuracy, per_class_chart)
from methodlab.models.d3gzsl import Critic, Generator, LearnSigmoid, Student, Teacher
from methodlab.models.gzsl import GZSLClassifier
from methodlab.registry import register_method

# ----------------------------------------------------------------------------------------------
# Labels


def label_mapping(seen: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    """`map_label_all` of the official code: (C,) long tensor sending seen class seen[i] (sorted)
    to i and unseen class unseen[j] (sorted) to |S| + j. A bijection onto [0, |S| + |U|)."""
    seen, unseen = seen.sort().values, unseen.sort().values
    mapping = torch.full((len(seen) + len(unseen),), -1, dtype=torch.long)
    mapping[seen] = torch.arange(len(seen))
    mapping[unseen] = torch.arange(len(seen), len(seen) + len(unseen))
    return mapping


# ----------------------------------------------------------------------------------------------
# The method


class D3GZSLConfig(Section):
    preset: str = Field("digits", description="named defaults (D3GZSL.presets): digits fits the built-in "
                        "digits_gzsl; cub is the official CUB setting (gzsl/argscub.py)")
    protocol: Literal["validation", "final"] = Field(
        "validation", description="validation: validation-unseen classes are held out as unseen "
        "(selection, sweeps); final: all trainval classes are seen (literature-comparable test)")
    variant: Literal["d3gzsl", "fclswgan"] = Field(
        "d3gzsl", description="d3gzsl: the method; fclswgan: the true f-CLSWGAN baseline (Xian et al., "
        "CVPR 2018): no student and no distillation, G's loss adds fclswgan_cls_weight x the NLL of the "
        "frozen teacher (pretrained on real seen features) on G's seen samples, and the GZSL classifier "
        "is a fresh softmax Linear(d, C) on real seen + syn_num synthetic unseen features")
    fclswgan_cls_weight: float = Field(0.01, ge=0, description="f-CLSWGAN's cls_weight (its CUB script: 0.01)")
    loss_variant: Variant = Field("faithful", description="faithful: the official code (double "
                                  "softmax, BCE-with-logits on [0,1] similarities); clean: the corrected form")
    lambda_cls: float = Field(1e-4, ge=0, description="L_cls weight (oodclass_loss_para)")
    lambda_id: float = Field(1e-4, ge=0, description="ID2SD weight on L_kl + L_be (kl_loss_para; 0 in the "
                             "released argscub.py, 1e-4 is D3GZSL); 0 with lambda_od=0 is plain f-CLSWGAN")
    lambda_od: float = Field(1e-4, ge=0, description="O2DBD weight (bi_loss_para; 0 in the released "
                             "argscub.py, 1e-4 is D3GZSL)")
    lambda_gp: float = Field(10.0, ge=0, description="WGAN-GP penalty weight (lambda1)")
    n_critic: int = Field(5, gt=0, description="critic steps per generator step (critic_iter)")
    syn_per_class: int = Field(gt=0, description="synthetic features per unseen class in each "
                               "L_aux batch (ood_train_syn_num)")
    noise_dim: int | None = Field(None, gt=0, description="nz; default the attribute dimension")
    gen_hidden: int = Field(gt=0, description="G's hidden width (ngh)")
    critic_hidden: int = Field(gt=0, description="D's hidden width (ndh)")
    embed_dim: int = Field(gt=0, description="teacher and student embedding size (embedSize)")
    teacher_epochs: int = Field(gt=0, description="o_epoch")
    teacher_batch_size: int = Field(128, gt=0, description="teacher minibatch (gan_batch_size)")
    teacher_loss_weight: float = Field(1e-3, gt=0, description="oodtrain_loss_para")
    sigmoid_weight: float = Field(1.0, description="LearnSigmoid w init")
    sigmoid_offset: float = Field(0.0, description="LearnSigmoid b init")
    lr_every: int = Field(20, gt=0, description="official epochs between lr changes")
    gan_lr_factor: float = Field(1.09, gt=0, description="G and D lr multiplier (the code *raises* it)")
    student_lr_factor: float = Field(0.98, gt=0)
    sigmoid_lr_factor: float = Field(0.99, gt=0)
    kd_temperature: float = Field(1.0, gt=0, description="clean variant: KL temperature T")
    bce_scale: float = Field(10.0, gt=0, description="clean variant: pair logits kappa * cos")
    eval_protocol: Literal["end_to_end", "fresh"] = Field(
        "end_to_end", description="end_to_end: the student (dependent_test); fresh: a new linear "
        "classifier on real seen + synthetic unseen features")
    syn_num: int = Field(gt=0, description="synthetic features per unseen class for `fresh`")
    fresh_epochs: int = Field(gt=0)
    fresh_lr: float = Field(gt=0)
    fresh_batch_size: int = Field(256, gt=0)
    calibration_gamma: float | Literal["val"] = Field(
        0.0, description="calibrated stacking (Chao et al. 2016): subtracted from the seen classes' "
        "log-probabilities before the GZSL argmax. 0 (default) = the official code (no calibration); "
        "a number fixes it (negative favours the seen classes); 'val' picks it from metrics.gzsl.GAMMA_GRID "
        "(0, +-0.01 ... +-100) by val H for the current networks (needs protocol=validation: only there "
        "are val's unseen classes unseen)")
    fidelity_per_class: int = Field(100, gt=0, description="G samples per seen class that the frozen "
                                    "teacher (trained on real seen features) classifies: seen_fidelity")

    @model_validator(mode="after")
    def _gamma(self):
        if self.calibration_gamma == "val" and self.protocol != "validation":
            raise ValueError("calibration_gamma='val' needs protocol=validation (under protocol=final the "
                             "validation-unseen classes are trained on, so val H cannot choose gamma); "
                             "set method.protocol=validation or a number, e.g. method.calibration_gamma=0")
        return self


@register_method("d3gzsl")
class D3GZSL(Method):
    Config = D3GZSLConfig
    stages = ("teacher", "gan")
    metric, mode, test_metric = "val_H", "max", "test_H"
    # Whole-split work before the first step (the train split cut to the seen classes, the
    # min-max scaling fit on it) needs the features in memory; they are small (CUB: 11,788 x
    # 2,048 float32, 97 MB), so streaming them would only add Ray Data's overhead.
    loaders = ("memory",)
    default_dataset = "digits_gzsl"
    # Every network trains with Adam(betas 0.5, 0.999) as in the official code (build_optimizers);
    # another train.optimizer is refused rather than silently replaced.
    optimizers = ("adam",)
    required_columns = ("features", "label")
    export_input = "features"
    # The values the two settings differ in; every other key is the config's Field default (the
    # official value). One loop batch is one generator iteration: train.batch_size = n_critic x
    # the critic minibatch.
    presets = {
        # The official CUB setting (gzsl/argscub.py), for xlsa17 features (jobs/configs/d3gzsl.yaml):
        # batch 1280 = 5 x the code's 256. One loop epoch is 1/5 of an official epoch, so the
        # official 2000 epochs are 10000 loop epochs; 2500 (= 500 official epochs) is where
        # f-CLSWGAN-style runs usually stop improving. Every Adam runs at lr 1e-4.
        "cub": {"train": {"epochs": 2500, "batch_size": 1280, "lr": 1e-4},
                "method": {"gen_hidden": 4096, "critic_hidden": 4096, "embed_dim": 2048, "teacher_epochs": 30,
                           "syn_per_class": 5, "syn_num": 300, "fresh_lr": 1e-4, "fresh_epochs": 20}},
        # The built-in digits-GZSL (~750 training rows, 64-d features): smaller networks, lr 1e-3
        # (at 1e-4 the student never predicted an unseen digit within 800 generator iterations),
        # critic minibatches of 64 (batch 320 = 5 x 64) with 20 synthetic rows per unseen digit
        # (the code's L_aux batches are about half synthetic: 250 next to 256 real), and a fresh
        # classifier that gets enough steps on a small set.
        "digits": {"train": {"epochs": 150, "batch_size": 320, "lr": 1e-3},
                   "method": {"gen_hidden": 512, "critic_hidden": 512, "embed_dim": 256, "teacher_epochs": 20,
                              "syn_per_class": 20, "syn_num": 100, "fresh_lr": 1e-3, "fresh_epochs": 30}},
    }
    search_space = {
        "method.lambda_id": {"loguniform": [1e-5, 1e-1]},
        "method.lambda_od": {"loguniform": [1e-5, 1e-1]},
        "method.lambda_cls": {"loguniform": [1e-5, 1e-2]},
        "method.syn_per_class": {"choice": [5, 10, 20, 50]},
        # Calibrated stacking as a Tune parameter (val_H chooses it across trials); within one run
        # method.calibration_gamma=val chooses it from a grid instead.
        "method.calibration_gamma": {"uniform": [-10.0, 10.0]},
    }
    smoke_overrides = ["train.epochs=2", "train.batch_size=160", "method.teacher_epochs=1",
                       "method.gen_hidden=32", "method.critic_hidden=32", "method.embed_dim=32",
                       "method.syn_num=10", "method.fresh_epochs=2", "method.n_critic=2"]
    # The demo selects on val (protocol=validation, the default) and calibrates there: without
    # calibrated stacking the student predicts a seen digit for nearly every unseen row within
    # the demo's ~180 generator iterations (test H 0.00 uncalibrated; see bench/results/d3gzsl.json).
    demo_overrides = ["train.epochs=60", "method.teacher_epochs=10", "method.calibration_gamma=val"]
    demo_baseline = ("f-CLSWGAN", ["method.variant=fclswgan"])

    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        if "train" not in data.splits:
            raise ConfigError("d3gzsl needs the whole train split in memory (scaling, the validation "
                              "protocol, the fresh classifier): set data.loader=memory")
        if "class_attributes" not in data.tables:
            raise DataError(f"dataset {data.info.uri} has no class_attributes table; d3gzsl needs "
                            "one attribute vector per class (see methodlab.data.gzsl)")
        meta, c = data.info.meta, data.info.num_classes
        self.attributes = torch.zeros(c, data.tables["class_attributes"]["attributes"].shape[1])
        self.attributes[data.tables["class_attributes"]["class_id"]] = data.tables["class_attributes"]["attributes"].float()
        val_unseen = torch.tensor(meta.get("val_unseen_classes", []), dtype=torch.long)
        trainval = torch.tensor(meta["seen_classes"], dtype=torch.long)
        self.val_unseen = val_unseen
        if self.mcfg.protocol == "validation":
            trainval = trainval[~torch.isin(trainval, val_unseen)]
        self.seen = trainval.sort().values
        self.unseen = torch.tensor(sorted(set(range(c)) - set(self.seen.tolist())), dtype=torch.long)
        if len(self.seen) == 0 or len(self.unseen) == 0:
            raise DataError(f"dataset {data.info.uri}: protocol {self.mcfg.protocol} leaves "
                            f"{len(self.seen)} seen and {len(self.unseen)} unseen classes; need both")
        self.mapping = label_mapping(self.seen, self.unseen)
        self.test_counts: tuple[torch.Tensor, torch.Tensor] | None = None   # ((3, C), unseen) of the last test
        # The shared loop iterates `data.splits["train"]` of this same bundle, so dropping the
        # validation-unseen rows here removes them from training; the min-max scaling is fit on
        # exactly the rows trained on (DATA_LOADER's MinMaxScaler on trainval; the code's extra
        # division by the max of the scaled features is a division by 1).
        train = data.splits["train"].tensors
        keep = torch.isin(train["label"], self.seen)
        data.splits["train"] = SplitData({k: v[keep] for k, v in train.items()})
        feats = data.splits["train"].tensors["features"].float()
        lo, hi = feats.min(0).values, feats.max(0).values
        span = hi - lo
        self.shift, self.scale = lo, torch.where(span > 0, 1 / span.clamp_min(1e-12), torch.ones_like(span))
        self._raw_example = data.splits["val"].tensors["features"][:2].clone()
        for split in data.splits.values():
            split.tensors["features"] = (split.tensors["features"].float() - self.shift) * self.scale
        self._generator_steps = 0      # invalidates the cached fresh classifier
        self._fresh_head: tuple[tuple[int, float], nn.Linear] | None = None

    # -- sizes --------------------------------------------------------------------------------

    @property
    def feature_dim(self) -> int:
        return self.data.info.columns["features"].shape[0]

    @property
    def att_dim(self) -> int:
        return self.attributes.shape[1]

    @classmethod
    def epochs_by_stage(cls, cfg):
        return {"teacher": cfg.method.teacher_epochs, "gan": cfg.train.epochs}

    # -- models and optimizers ------------------------------------------------------------------

    def build_models(self, stage, previous):
        m = self.mcfg
        teacher = previous["teacher"] if "teacher" in previous else \
            Teacher(self.feature_dim, m.embed_dim, len(self.seen))
        if stage == "teacher":
            return {"teacher": teacher}
        gan = {"teacher": freeze(teacher),
               "generator": Generator(m.noise_dim or self.att_dim, self.att_dim, m.gen_hidden, self.feature_dim),
               "critic": Critic(self.feature_dim, self.att_dim, m.critic_hidden)}
        if m.variant == "fclswgan":          # no student: its classifier is trained after G
            return gan
        return {**gan, "student": Student(self.feature_dim, m.embed_dim, self.data.info.num_classes),
                "sigmoid": LearnSigmoid(m.sigmoid_weight, m.sigmoid_offset)}

    def build_optimizers(self, stage, models):
        # Adam(lr, betas (0.5, 0.999)) for every network, as in gzsl/main.py (`optimizers` above).
        names = ["teacher"] if stage == "teacher" else [n for n in ("generator", "critic", "student", "sigmoid")
                                                        if n in models]
        return {n: torch.optim.Adam(models[n].parameters(), lr=self.cfg.train.lr, betas=(0.5, 0.999),
                                    weight_decay=self.cfg.train.weight_decay) for n in names}

    def build_schedulers(self, stage, optimizers, steps_per_epoch):
        if stage == "teacher":
            return {}
        # Stepped once per generator iteration; an official epoch is n_critic loop epochs.
        every = self.mcfg.lr_every * steps_per_epoch * self.mcfg.n_critic
        factors = {"generator": self.mcfg.gan_lr_factor, "critic": self.mcfg.gan_lr_factor,
                   "student": self.mcfg.student_lr_factor, "sigmoid": self.mcfg.sigmoid_lr_factor}
        return {n: torch.optim.lr_scheduler.StepLR(optimizers[n], every, gamma=f) for n, f in factors.items()
                if n in optimizers}

    # -- training -------------------------------------------------------------------------------

    def train_step(self, stage, models, optimizers, batch, ctx: StepContext):
        if stage == "teacher":
            return self._teacher_step(models["teacher"], optimizers["teacher"], batch)
        return self._gan_step(models, optimizers, batch, ctx)

    def _teacher_step(self, teacher, opt, batch):
        """L_pre = w NLL(C_o(E_o(x)), mapped seen label) on minibatches of teacher_batch_size."""
        total = torch.zeros(())
        chunks = batch["features"].split(self.mcfg.teacher_batch_size)
        for x, y in zip(chunks, batch["label"].split(self.mcfg.teacher_batch_size)):
            _, logits = teacher(x)
            loss = self.mcfg.teacher_loss_weight * F.cross_entropy(logits, self.mapping.to(y.device)[y])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total = total + loss.detach().cpu()
        return {"teacher_loss": total / len(chunks)}

    def generate(self, generator: nn.Module, classes: torch.Tensor) -> torch.Tensor:
        """G(z, a_c) for each entry of `classes` (n,), z ~ N(0, I): (n, d). One call, so a
        DDP-wrapped generator sees one forward per backward."""
        att = self.attributes.to(classes.device)[classes]
        z = torch.randn(len(classes), distributed.unwrap(generator).noise_dim, device=classes.device)
        return generator(z, att)

    def aux_losses(self, models: dict, x_syn: torch.Tensor, y_syn: torch.Tensor,
                   x_real: torch.Tensor, y_real: torch.Tensor) -> dict[str, torch.Tensor]:
        """L_cls, L_kl, L_be, L_od and their weighted sum `aux` on X = [synthetic unseen; real seen]
        (calc_ood_loss). The teacher is frozen but differentiable w.r.t. its input, so in the
        generator step L_od reaches G through the teacher's score as in the code. With
        lambda_id = lambda_od = 0 (plain f-CLSWGAN) the teacher and the distillation terms are not
        computed at all, so the baseline also costs what the baseline costs."""
        m = self.mcfg
        x, y = torch.cat([x_syn, x_real]), torch.cat([y_syn, y_real])
        z_s, logits, h_s = models["student"](x)
        cls = F.cross_entropy(logits, y)
        if m.lambda_id == 0 and m.lambda_od == 0:
            # The OOD head and the sigmoid still take part in the backward with a zero gradient:
            # DDP (without find_unused_parameters) expects every parameter in every reduction.
            unused = 0 * (h_s.sum() + models["sigmoid"](logits.new_zeros(1)).sum())
            return {"cls": cls, "aux": m.lambda_cls * cls + unused}
        z_t, t_logits = models["teacher"](x)
        n = len(x_syn)
        seen = self.seen.to(x.device)
        kl = kl_distillation(t_logits[n:], logits[n:, seen], m.loss_variant, m.kd_temperature)
        be = embedding_distillation(z_t[n:], z_s[n:], y_real, m.loss_variant, m.bce_scale)
        _, h_t = teacher_confidence(t_logits, models["sigmoid"])
        od = ood_distillation(h_s, h_t, y, m.loss_variant, m.bce_scale)
        # Terms at weight 0 are still computed when the other distillation weight is not, so each
        # trainable parameter takes part in every backward (DDP without find_unused_parameters).
        aux = m.lambda_cls * cls + m.lambda_id * (kl + be) + m.lambda_od * od
        return {"cls": cls, "kl": kl, "be": be, "od": od, "aux": aux}

    def _syn_classes(self, device) -> torch.Tensor:
        """The classes of L_aux's synthetic unseen rows; none for f-CLSWGAN, whose GAN steps use
        seen samples only."""
        per_class = 0 if self.mcfg.variant == "fclswgan" else self.mcfg.syn_per_class
        return self.unseen.to(device).repeat_interleave(per_class)

    def critic_step(self, models, optimizers, x, y) -> dict[str, torch.Tensor]:
        """One critic iteration: L_D + lambda_gp GP + L_aux; steps D, the student and the sigmoid.
        G is frozen: its samples carry no graph."""
        m = self.mcfg
        y_syn = self._syn_classes(x.device)
        with torch.no_grad():
            out = self.generate(distributed.unwrap(models["generator"]), torch.cat([y, y_syn]))
        fake, x_syn = out[:len(y)], out[len(y):]
        alpha = torch.rand(len(x), 1, device=x.device)
        d_real, d_fake, gp = critic_terms(models["critic"], x, fake, self.attributes.to(x.device)[y], alpha)
        loss_d = d_fake.mean() - d_real.mean() + m.lambda_gp * gp
        if m.variant == "fclswgan":
            _step(optimizers, ("critic",), loss_d)
        else:
            aux = self.aux_losses(models, x_syn, y_syn, x, y)
            _step(optimizers, ("critic", "student", "sigmoid"), loss_d + aux["aux"])
        return {"loss_d": loss_d.detach(), "gp": gp.detach(), "wasserstein": (d_real.mean() - d_fake.mean()).detach()}

    def generator_step(self, models, optimizers, x, y) -> dict[str, torch.Tensor]:
        """L_G + L_aux with fresh samples that keep G's graph; steps G, the student and the sigmoid.
        The critic is frozen and called unwrapped (no DDP reduction expected from it)."""
        critic = distributed.unwrap(models["critic"])
        critic.requires_grad_(False)
        try:
            y_syn = self._syn_classes(x.device)
            out = self.generate(models["generator"], torch.cat([y, y_syn]))
            fake, x_syn = out[:len(y)], out[len(y):]
            loss_g = -critic(fake, self.attributes.to(x.device)[y]).mean()
            if self.mcfg.variant == "fclswgan":
                # f-CLSWGAN's classification loss: the frozen pretrained classifier (the teacher)
                # on G's seen samples, its gradient reaching G through the teacher's input.
                cls = F.cross_entropy(models["teacher"](fake)[1], self.mapping.to(y.device)[y])
                aux = {"cls": cls, "aux": self.mcfg.fclswgan_cls_weight * cls}
                _step(optimizers, ("generator",), loss_g + aux["aux"])
            else:
                aux = self.aux_losses(models, x_syn, y_syn, x, y)
                _step(optimizers, ("generator", "student", "sigmoid"), loss_g + aux["aux"])
        finally:
            critic.requires_grad_(True)
        return {"loss_g": loss_g.detach(), **{k: v.detach() for k, v in aux.items()}}

    def _gan_step(self, models, optimizers, batch, ctx):
        x, y = batch["features"], batch["label"]
        rows = torch.arange(len(x), device=x.device).tensor_split(min(self.mcfg.n_critic, len(x)))
        critic_logs = [self.critic_step(models, optimizers, x[r], y[r]) for r in rows]
        logs = self.generator_step(models, optimizers, x[rows[-1]], y[rows[-1]])
        self._generator_steps += 1
        for s in ctx.extra.get("schedulers", {}).values():
            s.step()
        logs.update({k: torch.stack([c[k] for c in critic_logs]).mean() for k in critic_logs[0]})
        return logs

    # -- evaluation -----------------------------------------------------------------------------

    def _eval_unseen(self, split: str, device) -> torch.Tensor:
        """Classes whose rows count towards U on `split`: val -> the validation-unseen classes
        (unseen to the model only under protocol=validation), test -> the classes the model
        never saw real features of."""
        return (self.val_unseen if split == "val" else self.unseen).to(device)

    @torch.no_grad()
    def _logits(self, net: nn.Module, features: torch.Tensor, device) -> torch.Tensor:
        return torch.cat([net(b.to(device)) for b in features.split(4096)])

    def fresh_classifier(self, models: dict, device, seed: int) -> nn.Linear:
        """The alternative protocol (dependent_test=False): a new Linear(e, C) on frozen student
        embeddings of the real training rows plus `syn_num` G samples per unseen class; Adam
        (fresh_lr, betas (0.5, 0.999)), `fresh_epochs` epochs, the last one kept. Under
        variant=fclswgan the same softmax is trained on the features themselves (f-CLSWGAN's
        final classifier: `embedding` is the identity)."""
        m = self.mcfg
        g = torch.Generator(device="cpu").manual_seed(seed)
        generator = models["generator"]
        train = self.data.splits["train"].tensors
        with torch.no_grad():
            y_syn = self.unseen.repeat_interleave(m.syn_num)
            z = torch.randn(len(y_syn), generator.noise_dim, generator=g)
            x_syn = generator(z.to(device), self.attributes[y_syn].to(device))
            x_all = torch.cat([train["features"].to(device), x_syn])
            emb = self._logits(self.embedding(models), x_all, device)
        y_all = torch.cat([train["label"], y_syn]).to(device)
        head = nn.Linear(emb.shape[1], self.data.info.num_classes).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head.reset_parameters()
        opt = torch.optim.Adam(head.parameters(), lr=m.fresh_lr, betas=(0.5, 0.999))
        for _ in range(m.fresh_epochs):
            for rows in torch.randperm(len(y_all), generator=g).split(m.fresh_batch_size):
                rows = rows.to(device)
                loss = F.cross_entropy(head(emb[rows]), y_all[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return head.eval()

    def classifier(self, models: dict, kind: str, device) -> nn.Module:
        """The scaled-feature -> logits classifier of an evaluation protocol. The fresh head is
        trained once per state of the networks (generator-step count) and `fresh_lr`, and reused
        by the val and test evaluations and the export of the same epoch."""
        if kind == "end_to_end":
            return models["student"].net
        state = (self._generator_steps, self.mcfg.fresh_lr)       # (bench/d3gzsl.py varies fresh_lr)
        if self._fresh_head is None or self._fresh_head[0] != state:
            self._fresh_head = (state, self.fresh_classifier(models, device, self.cfg.train.seed))
        return nn.Sequential(self.embedding(models), self._fresh_head[1])

    def embedding(self, models: dict) -> nn.Module:
        """What the fresh classifier reads: the student's E_s, or the features themselves for
        f-CLSWGAN (which has no student)."""
        return nn.Identity() if self.mcfg.variant == "fclswgan" else models["student"].net.embed

    def eval_protocols(self, split: str) -> list[str]:
        """The headline protocol first; on the test split the other one too. f-CLSWGAN has only
        its fresh softmax."""
        if self.mcfg.variant == "fclswgan":
            return ["fresh"]
        kinds = [self.mcfg.eval_protocol]
        if split == "test":
            kinds.append("fresh" if kinds[0] == "end_to_end" else "end_to_end")
        return kinds

    def evaluate(self, stage, models, split, device):
        """Sharded: each rank scores its rows; the per-class counts of every protocol go into one
        sum over the ranks."""
        rows = distributed.shard(self.data.splits[split]).tensors
        features, labels = rows["features"], rows["label"].to(device)
        unseen = self._eval_unseen(split, device)
        if stage == "teacher":
            # The teacher alone predicts seen classes only: its U (and H) are 0 by construction;
            # reported so that val_H exists in every epoch's metrics.
            t_logits = self._logits(lambda b: models["teacher"](b)[1], features, device)
            logits = torch.full((len(labels), self.data.info.num_classes), -torch.inf, device=device)
            logits[:, self.seen.to(device)] = t_logits
            seen_rows = torch.isin(labels, self.seen.to(device))
            right = (logits.argmax(1)[seen_rows] == labels[seen_rows]).sum()
            counts = distributed.all_sum(torch.cat([gzsl_counts(logits, labels, unseen).flatten(),
                                                    torch.stack([right, seen_rows.sum()]).double()]))
            scores = gzsl_scores(counts[:-2].view(3, -1), unseen)
            acc = float(counts[-2] / counts[-1]) if counts[-1] > 0 else 0.0
            return {f"{split}_teacher_acc": acc, **{f"{split}_{k}": v for k, v in scores.items()}}
        kinds = self.eval_protocols(split)
        seen = self.seen.to(device)
        plain = [self._logits(self.classifier(models, kind, device), features, device) for kind in kinds]
        gammas = [self.gamma(models, kind, device, logits if split == "val" else None)
                  for kind, logits in zip(kinds, plain)]
        counts = distributed.all_sum(torch.stack([
            torch.stack([gzsl_counts(calibrated(logits, seen, gamma), labels, unseen), gzsl_counts(logits, labels, unseen)])
            for logits, gamma in zip(plain, gammas)]))                                      # (kinds, 2, 3, C)
        out: dict[str, float] = {f"{split}_seen_fidelity": self.seen_fidelity(models, device)}
        for i, kind in enumerate(kinds):
            prefix = f"{split}_" if i == 0 else f"{split}_{'e2e' if kind == 'end_to_end' else 'fresh'}_"
            out.update({prefix + k: v for k, v in gzsl_scores(counts[i, 0], unseen).items()})
            if self.mcfg.calibration_gamma != 0:
                out[prefix + "gamma"] = gammas[i]
                out.update({f"{prefix}uncalibrated_{k}": v for k, v in gzsl_scores(counts[i, 1], unseen).items()
                            if k != "ZSL"})        # ZSL argmaxes over unseen classes only: gamma cannot move it
        if split == "test":
            self.test_counts = (counts[0, 0].cpu(), unseen.cpu())   # the final epoch charts them
        return out

    def gamma(self, models: dict, kind: str, device, val_logits: torch.Tensor | None = None) -> float:
        """The calibrated-stacking gamma of `kind`'s classifier: the configured number, or under
        `val` the GAMMA_GRID value with the best val H for these networks (computed again at test
        time, so that the test split is scored with the gamma of exactly the networks it scores,
        the best epoch's where tracking.register=best). `val_logits`: this rank's val logits
        when the caller has them."""
        gamma = self.mcfg.calibration_gamma
        if gamma != "val":
            return float(gamma)
        if val_logits is None:
            features = distributed.shard(self.data.splits["val"]).tensors["features"]
            val_logits = self._logits(self.classifier(models, kind, device), features, device)
        labels = distributed.shard(self.data.splits["val"]).tensors["label"].to(device)
        unseen = self._eval_unseen("val", device)
        counts = distributed.all_sum(calibration_counts(val_logits, labels, unseen, self.seen.to(device)))
        return best_gamma(counts, unseen)

    @torch.no_grad()
    def seen_fidelity(self, models: dict, device) -> float:
        """Per-class accuracy of the frozen teacher, a classifier trained on real seen features
        only, on `fidelity_per_class` G(z, a_c) samples of each seen class c (fixed seed): whether
        the generator reproduces the classes it was trained on at all. Near chance (1/|S|), its
        unseen samples cannot be trusted either."""
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        generator = distributed.unwrap(models["generator"])
        y = self.seen.repeat_interleave(self.mcfg.fidelity_per_class)
        z = torch.randn(len(y), generator.noise_dim, generator=g)
        x = generator(z.to(device), self.attributes[y].to(device))
        teacher = distributed.unwrap(models["teacher"])
        pred = self.seen.to(device)[self._logits(lambda b: teacher(b)[1], x, device).argmax(1)]
        return per_class_accuracy(class_counts(pred, y.to(device), self.data.info.num_classes), self.seen.to(device))

    def epoch_artifacts(self, stage, epoch):
        if stage != self.stages[-1] or epoch != self.stage_epochs(stage) - 1 or self.test_counts is None:
            return {}
        counts, unseen = self.test_counts
        classes = [str(c) for c in self.data.info.meta.get("classes", range(self.data.info.num_classes))]
        return {"per_class_test.png": per_class_chart(counts, unseen, classes,
                                                      f"D3GZSL ({self.mcfg.eval_protocol}), {self.data.info.name}")}

    # -- export ---------------------------------------------------------------------------------

    def spec(self) -> dict:
        return {"arch": "gzsl_classifier",
                "kwargs": {"feature_dim": self.feature_dim, "num_classes": self.data.info.num_classes,
                           "embed_dim": 0 if self.mcfg.variant == "fclswgan" else self.mcfg.embed_dim}}

    def export(self, models):
        """Raw features -> logits over all classes (class-id order): the training-time scaling,
        the student's embedding and the headline protocol's classifier."""
        model = GZSLClassifier(**self.spec()["kwargs"])
        models = {k: distributed.unwrap(v) for k, v in models.items()}
        if self.eval_protocols("val")[0] == "fresh":
            head = self.classifier(models, "fresh", next(models["generator"].parameters()).device)[1]
        else:
            head = models["student"].net.fc
        model.embed.load_state_dict(self.embedding(models).state_dict())
        model.fc.load_state_dict(head.state_dict())
        model.shift.copy_(self.shift)
        model.scale.copy_(self.scale)
        return model.cpu().eval(), self.spec()

    def example_input(self):
        return self._raw_example.numpy()


def _step(optimizers: dict, names: tuple[str, ...], loss: torch.Tensor) -> None:
    """One backward through `loss`, then a step of exactly the named optimizers (the official
    alternation: the critic's step leaves G untouched and G's leaves the critic)."""
    for n in names:
        optimizers[n].zero_grad(set_to_none=True)
    loss.backward()
    for n in names:
        optimizers[n].step()
