"""1-D regression illustration: finetuning on new points alone wrecks the old region; a KL term keeps it.

The paper's toy picture of claim 1 (forgetting = drift of the predictive distribution on old inputs).
A small Bayesian MLP — here a posterior approximated by S parameter samples, either a deep ensemble
(`--method ensemble`, the cheap default) or SGHMC particles (`--method sghmc`) — is fit to noisy points
of a smooth function on an "old" interval. It is then finetuned on points from a disjoint "new"
interval, (a) alone, and (b) with `kl_coeff * KL(p_ref(y|x) || p_theta(y|x))` added, where p_ref is the
frozen predictive Gaussian of the fitted model (mean and variance over the samples plus observation
noise) and x is drawn uniformly over the old interval every step: inputs only, no old labels, the 1-D
analogue of self-generated replay.

Three panels (before / finetuned / finetuned + KL): data, predictive mean and a ±2σ band.
`summary.json`: {"old_rmse": {"before", "finetuned", "kl"}, "new_rmse": {"finetuned", "kl"}} — RMSE of
the predictive mean on the old and new training points. Expected: the finetuned old RMSE is several
times the KL one, and both fit the new points about equally well.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forgetting.experiments import framework, repeat
from forgetting.experiments.framework import RunSpec


@dataclass(frozen=True)
class Knobs:
    """Knobs of the 1-D regression illustration."""

    seed: int = 0  # seed for the data, the initialization and the sampler noise
    seeds: int = 3  # independent repetitions (seeds seed, seed+1, ...): mean and 95-percent t interval over them
    n_old: int = 40  # number of old points (x uniform over the old interval)
    n_new: int = 40  # number of new points (x uniform over the new interval)
    old_lo: float = -3.0  # old interval, lower end
    old_hi: float = -0.5  # old interval, upper end
    new_lo: float = 0.5  # new interval, lower end
    new_hi: float = 3.0  # new interval, upper end
    noise: float = 0.1  # observation noise std (data and likelihood)
    method: str = "ensemble"  # posterior approximation: ensemble (Adam, MAP members) or sghmc (particles)
    samples: int = 10  # ensemble members / SGHMC particles
    hidden: int = 64  # hidden width of the 2-hidden-layer tanh MLP
    prior_std: float = 1.0  # Gaussian prior std on the weights (weight decay for the ensemble)
    fit_steps: int = 3000  # full-batch steps fitting the old points
    fit_lr: float = 3e-3  # learning rate for the fit (Adam) / step size scale (SGHMC)
    finetune_steps: int = 2000  # full-batch steps finetuning on the new points
    finetune_lr: float = 3e-3  # learning rate for finetuning
    kl_coeff: float = 1.0  # coefficient of the KL term in the regularized finetune
    replay_points: int = 64  # old-interval inputs drawn per step for the KL term
    sghmc_lr: float = 3e-5  # SGHMC step size eta (on the per-point potential; replaces the learning rates)
    sghmc_friction: float = 0.1  # SGHMC friction (1 - momentum decay per step)
    sghmc_temperature: float = 1.0  # SGHMC temperature (1 = the Bayesian posterior)

    CHECKS: ClassVar[dict] = {  # framework.check_knobs: checked before anything runs
        "n_old": (framework.positive,), "n_new": (framework.positive,), "noise": (framework.positive,),
        "hidden": (framework.positive,), "prior_std": (framework.positive,), "fit_steps": (framework.positive,),
        "fit_lr": (framework.positive,), "finetune_steps": (framework.positive,),
        "finetune_lr": (framework.positive,), "replay_points": (framework.positive,),
        "sghmc_lr": (framework.positive,), "kl_coeff": (framework.nonnegative,),
        "sghmc_temperature": (framework.nonnegative,), "seed": (framework.nonnegative,), "seeds": (framework.positive,),
        "sghmc_friction": (framework.fraction,),
    }

    def validate(self) -> None:
        if self.method not in ("ensemble", "sghmc"):
            raise ValueError(f"--method must be ensemble or sghmc, got {self.method!r}")
        if self.samples < 2:
            raise ValueError("--samples must be at least 2 (the predictive variance needs a spread)")


PRESETS = {
    "mini": Knobs(),
    "paper": Knobs(seeds=1, method="sghmc", samples=32, fit_steps=20000, finetune_steps=10000, kl_coeff=10.0),
}


@dataclass(frozen=True)
class PhaseConfig:
    """One run: `fit` (old points) or `finetune` (new points, optional KL to the fitted predictive)."""

    knobs: Knobs = Knobs()
    phase: str = "fit"  # fit | finetune
    kl_coeff: float = 0.0  # KL coefficient (finetune only)
    load_path: str = ""  # run directory of the fit (finetune only)


def truth(x):
    """The smooth function behind the points."""
    return np.sin(1.5 * x) + 0.4 * x


def make_data(k: Knobs):
    rng = np.random.default_rng(k.seed)
    x_old = rng.uniform(k.old_lo, k.old_hi, size=k.n_old)
    x_new = rng.uniform(k.new_lo, k.new_hi, size=k.n_new)
    y_old = truth(x_old) + k.noise * rng.standard_normal(k.n_old)
    y_new = truth(x_new) + k.noise * rng.standard_normal(k.n_new)
    return tuple(a.astype(np.float32) for a in (x_old, y_old, x_new, y_new))


# ----------------------------------------------------------------------------------------- the model


def _init(key, hidden: int):
    import jax
    import jax.numpy as jnp

    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (1, hidden)) * 1.0,
        "b1": jax.random.uniform(k2, (1, hidden), minval=-3.0, maxval=3.0),
        "w2": jax.random.normal(k3, (hidden, hidden)) / math.sqrt(hidden),
        "b2": jnp.zeros((1, hidden)),
        "w3": jax.random.normal(jax.random.fold_in(key, 7), (hidden, 1)) / math.sqrt(hidden),
        "b3": jnp.zeros((1, 1)),
    }


def _forward(p, x):
    """x: [N] -> [N] for one parameter sample."""
    import jax.numpy as jnp

    h = jnp.tanh(x[:, None] @ p["w1"] + p["b1"])
    h = jnp.tanh(h @ p["w2"] + p["b2"])
    return (h @ p["w3"] + p["b3"])[:, 0]


def _predict_all(ps, x):
    import jax

    return jax.vmap(_forward, in_axes=(0, None))(ps, x)  # [S, N]


def predictive(ps, x, noise: float):
    """Gaussian predictive over the samples: mean [N], variance [N] (sample spread + noise²)."""
    f = _predict_all(ps, x)
    return f.mean(0), f.var(0) + noise**2


def gaussian_kl(m_ref, v_ref, m, v):
    """KL(N(m_ref, v_ref) || N(m, v)), elementwise."""
    import jax.numpy as jnp

    return 0.5 * (jnp.log(v) - jnp.log(v_ref) + (v_ref + (m_ref - m) ** 2) / v - 1.0)


def _objective(k: Knobs, x, y, n_total: int):
    """Per-sample negative log posterior (up to a constant), summed over samples: the SGHMC potential.

    Scaled by 1/n_total so that Adam and SGHMC see gradients of the same size."""
    import jax
    import jax.numpy as jnp

    def energy(ps):
        f = _predict_all(ps, x)  # [S, N]
        nll = jnp.sum((f - y[None, :]) ** 2) / (2 * k.noise**2)
        prior = sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(ps)) / (2 * k.prior_std**2)
        return (nll + prior) / n_total

    return energy


def _train(k: Knobs, ps, energy_fn, steps: int, lr: float, key, n_total: int, extra_fn=None):
    """Full-batch training of all samples jointly: Adam (ensemble) or SGHMC (particles).

    `extra_fn(ps, key) -> scalar` adds a term (the KL), scaled like one nat per sample-set."""
    import jax
    import jax.numpy as jnp
    import optax

    def loss(ps, key):
        total = energy_fn(ps)
        if extra_fn is not None:
            total = total + extra_fn(ps, key)
        return total

    grad = jax.grad(loss)
    if k.method == "ensemble":
        opt = optax.adam(lr)

        def step(carry, key):
            ps, st = carry
            upd, st = opt.update(grad(ps, key), st, ps)
            return (optax.apply_updates(ps, upd), st), None

        (ps, _), _ = jax.lax.scan(step, (ps, opt.init(ps)), jax.random.split(key, steps))
        return ps

    # SGHMC (Chen et al. 2014) with full-batch gradients: v <- (1-a) v - eta' grad U + N(0, 2 a eta' T),
    # theta <- theta + v, with U = n_total * energy (energy is per point) and eta' = eta / n_total.
    a, temp = k.sghmc_friction, k.sghmc_temperature
    eta = k.sghmc_lr

    def step(carry, key):
        ps, v = carry
        kg, kn = jax.random.split(key)
        g = grad(ps, kg)
        leaves, tree = jax.tree_util.tree_flatten(v)
        keys = jax.random.split(kn, len(leaves))
        noise = jax.tree_util.tree_unflatten(
            tree, [jax.random.normal(kk, leaf.shape) for kk, leaf in zip(keys, leaves)])
        scale = jnp.sqrt(2.0 * a * eta * temp / n_total)
        v = jax.tree_util.tree_map(lambda v_, g_, n_: (1 - a) * v_ - eta * g_ + scale * n_, v, g, noise)
        ps = jax.tree_util.tree_map(lambda p_, v_: p_ + v_, ps, v)
        return (ps, v), None

    v0 = jax.tree_util.tree_map(jnp.zeros_like, ps)
    (ps, _), _ = jax.lax.scan(step, (ps, v0), jax.random.split(key, steps))
    return ps


def _save(path: Path, ps) -> None:
    np.savez(path / "params.npz", **{k: np.asarray(v) for k, v in ps.items()})


def _load(path: Path):
    import jax.numpy as jnp

    with np.load(Path(path) / "params.npz") as z:
        return {k: jnp.asarray(z[k]) for k in z.files}


def run_phase(cfg: PhaseConfig, run_dir: Path) -> dict:
    """The framework's in-process run: fit or finetune, save the samples, return RMSEs and curves."""
    import jax
    import jax.numpy as jnp

    k = cfg.knobs
    x_old, y_old, x_new, y_new = map(jnp.asarray, make_data(k))
    key = jax.random.key(k.seed)
    if cfg.phase == "fit":
        ps = jax.vmap(lambda kk: _init(kk, k.hidden))(jax.random.split(jax.random.fold_in(key, 1), k.samples))
        energy = _objective(k, x_old, y_old, k.n_old)
        ps = jax.jit(lambda ps, key: _train(k, ps, energy, k.fit_steps, k.fit_lr, key, k.n_old))(ps, jax.random.fold_in(key, 2))
    elif cfg.phase == "finetune":
        ref = _load(Path(cfg.load_path))
        energy = _objective(k, x_new, y_new, k.n_new)
        extra = None
        if cfg.kl_coeff > 0:
            def extra(ps, kk):
                xs = jax.random.uniform(kk, (k.replay_points,), minval=k.old_lo, maxval=k.old_hi)
                m_ref, v_ref = predictive(ref, xs, k.noise)
                m, v = predictive(ps, xs, k.noise)
                return cfg.kl_coeff * jnp.mean(gaussian_kl(jax.lax.stop_gradient(m_ref),
                                                           jax.lax.stop_gradient(v_ref), m, v))
        ps = jax.jit(lambda ps, key: _train(k, ps, energy, k.finetune_steps, k.finetune_lr, key, k.n_new, extra))(
            ref, jax.random.fold_in(key, 3))
    else:
        raise ValueError(f"phase must be fit or finetune, got {cfg.phase!r}")
    _save(run_dir, ps)

    def rmse(x, y):
        m, _ = predictive(ps, x, k.noise)
        return float(jnp.sqrt(jnp.mean((m - y) ** 2)))

    grid = np.linspace(min(k.old_lo, k.new_lo) - 0.5, max(k.old_hi, k.new_hi) + 0.5, 241).astype(np.float32)
    m, v = predictive(ps, jnp.asarray(grid), k.noise)
    return {
        "old_rmse": rmse(x_old, y_old),
        "new_rmse": rmse(x_new, y_new),
        "curve": {"x": grid.tolist(), "mean": np.asarray(m).tolist(), "std": np.sqrt(np.asarray(v)).tolist()},
    }


# ----------------------------------------------------------------------------------------- figure


def runs_one(knobs: Knobs, out: Path, name_suffix: str = "") -> list[RunSpec]:
    """One seed's runs (`knobs.seed`), named with `name_suffix` (the finetunes hold the fit's directory,
    which an in-process run names after the run: experiments/repeat.py)."""
    # Knobs a phase does not use are reset to their defaults, so that changing them (e.g. --kl_coeff)
    # does not change that phase's config hash and its finished run is reused.
    d = Knobs()
    fit_knobs = dataclasses.replace(knobs, finetune_steps=d.finetune_steps, finetune_lr=d.finetune_lr,
                                    kl_coeff=d.kl_coeff, replay_points=d.replay_points)
    ft_knobs = dataclasses.replace(knobs, kl_coeff=d.kl_coeff)  # the coefficient lives in PhaseConfig
    fit = RunSpec("fit_old" + name_suffix, PhaseConfig(fit_knobs, "fit"), fn=run_phase)
    load = str(framework.run_dir(fit, out))
    return [
        fit,
        RunSpec("finetuned" + name_suffix, PhaseConfig(ft_knobs, "finetune", 0.0, load), fn=run_phase, after=(fit.name,)),
        RunSpec("kl" + name_suffix, PhaseConfig(ft_knobs, "finetune", knobs.kl_coeff, load), fn=run_phase, after=(fit.name,)),
    ]


def summarize_one(knobs: Knobs, out: Path, name_suffix: str = "") -> dict:
    """One seed's summary."""
    dirs = framework.locate(runs_one(knobs, out, name_suffix), out)
    r = {name.removesuffix(name_suffix) if name_suffix else name: framework.read_result(d) for name, d in dirs.items()}
    return {
        "old_rmse": {"before": r["fit_old"]["old_rmse"], "finetuned": r["finetuned"]["old_rmse"],
                     "kl": r["kl"]["old_rmse"]},
        "new_rmse": {"finetuned": r["finetuned"]["new_rmse"], "kl": r["kl"]["new_rmse"]},
    }


def runs(knobs: Knobs, out: Path) -> list[RunSpec]:
    return repeat.runs(runs_one, knobs, out)


def summarize(knobs: Knobs, out: Path) -> dict:
    return repeat.summarize(runs_one, summarize_one, knobs, out)


def plot(knobs: Knobs, out: Path, summary: dict) -> None:
    from forgetting.experiments import plotting

    dirs = framework.locate(runs(knobs, out), out)
    x_old, y_old, x_new, y_new = make_data(knobs)
    panels = [("fit_old", "Before: fit to old points", "before"),
              ("finetuned", "Finetuned on new points", "finetuned"),
              ("kl", f"Finetuned + KL on old inputs (c={knobs.kl_coeff:g})", "kl")]
    fig, axes = plotting.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, (name, title, key) in zip(axes, panels):
        c = framework.read_result(dirs[name])["curve"]
        x, m, s = np.array(c["x"]), np.array(c["mean"]), np.array(c["std"])
        ax.axvspan(knobs.old_lo, knobs.old_hi, color="tab:blue", alpha=0.06, lw=0)
        ax.axvspan(knobs.new_lo, knobs.new_hi, color="tab:orange", alpha=0.06, lw=0)
        ax.fill_between(x, m - 2 * s, m + 2 * s, color="tab:green", alpha=0.25, lw=0, label="±2σ")
        ax.plot(x, m, color="tab:green", lw=2, label="predictive mean")
        ax.plot(x, truth(x), color="k", lw=1, ls="--", label="true function")
        ax.scatter(x_old, y_old, s=14, color="tab:blue", label="old points", zorder=3)
        if name != "fit_old":
            ax.scatter(x_new, y_new, s=14, color="tab:orange", label="new points", zorder=3)
        text = f"old RMSE {plotting.pm(summary['old_rmse'], key)}"  # ± half of the 95% interval over seeds
        if key in summary["new_rmse"]:
            text += f"\nnew RMSE {plotting.pm(summary['new_rmse'], key)}"
        ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", fontsize=9)
        ax.set_title(title)
        ax.set_xlabel("x")
        ax.set_ylim(-4, 4)
    axes[0].set_ylabel("y")
    axes[-1].legend(loc="lower right")
    plotting.save(fig, Path(out) / "regression_1d")


if __name__ == "__main__":
    framework.main(Knobs, PRESETS, runs, summarize, plot, doc=__doc__)
