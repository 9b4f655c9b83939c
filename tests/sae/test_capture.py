import numpy as np
import pytest

from prunesae_jax import sae

testing = pytest.importorskip("prunesae_jax.testing")
models = pytest.importorskip("prunesae_jax.models")


def test_capture_store_matches_resid_post_and_trains(tmp_path):
    if not hasattr(testing, "tiny_config"):
        pytest.skip("prunesae_jax.testing.tiny_config not available yet")
    cfg = testing.tiny_config()
    params = models.init_params(cfg, 0)
    toks = np.random.default_rng(0).integers(1, cfg.vocab_size, (6, 12)).astype(np.int32)
    am = np.ones_like(toks)
    am[4, 9:] = 0  # padding is never stored
    st = sae.capture_activations(cfg, params, toks, 1, str(tmp_path / "s"), attention_masks=am, model_id="tiny",
                                 dtype="float32", batch_size=4)
    assert len(st) == 6 * 11 - 3 and st.metadata["layer"] == 1 and st.metadata["model_id"] == "tiny"
    ref = np.asarray(models.resid_post(cfg, params, toks, am, layers=(1,))[1])
    keep = am.astype(bool)
    keep[:, 0] = False
    np.testing.assert_allclose(st.read(0, len(st)), ref[keep], atol=1e-5)
    d = cfg.hidden_size
    r = sae.capture_and_train(cfg, params, toks, 1, sae.SAEConfig(d, 2 * d, k=4),
                              sae.TrainConfig(n_steps=3, batch_size=32, progress=False, log_every=0))
    assert r.params["W_dec"].shape == (1, 2 * d, d) and np.isfinite(r.final["fvu"]).all()


def test_capture_with_masks_changes_activations(tmp_path):
    if not hasattr(testing, "tiny_config"):
        pytest.skip("prunesae_jax.testing.tiny_config not available yet")
    masks_mod = pytest.importorskip("prunesae_jax.pruning.masks")
    import jax
    cfg = testing.tiny_config()
    params = models.init_params(cfg, 0)
    masks = jax.tree.map(lambda a: None, params)
    masks["layers"] = [dict({k: None for k in lp}, **{k: np.zeros(lp[k].shape, bool) for k in ("down_proj",)})
                       for lp in params["layers"]]
    toks = np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 8)).astype(np.int32)
    dense = sae.capture_activations(cfg, params, toks, 0, None)
    pruned = sae.capture_activations(cfg, params, toks, 0, None, masks=masks, mask_id="no_mlp")
    assert pruned.metadata["mask_id"] == "no_mlp"
    assert not np.allclose(dense.read(0, len(dense)), pruned.read(0, len(pruned)))
    assert masks_mod is not None
