import pytest
import torch

from advisor import data, models
from advisor.errors import ConfigError
from advisor.train import evaluate, loss_and_grads, loss_per_config, sgd


def digits_net(sigma_w=1.0, seeds=(0,), **kw):
    return models.mlp(64, 10, [32, 32], "tanh", sigma_w, list(seeds), **kw)


def test_mlp_shapes_names_and_init_variance():
    net = models.mlp(512, 10, [256, 128], "relu", 2.0, [0, 1, 2])
    assert net.names == ["fc1", "fc2", "fc3"]
    assert [tuple(w.shape) for w in net.weights] == [(3, 256, 512), (3, 128, 256), (3, 10, 128)]
    assert all(torch.equal(b, torch.zeros_like(b)) for b in net.biases)
    # W ~ N(0, sigma^2 / fan_in): fan_in * var = sigma^2 = 4 (131072 samples: 1% rel. error)
    assert (512 * net.weights[0].var()).item() == pytest.approx(4.0, rel=0.02)
    assert list(models.trainable_weights(net)) == ["fc1", "fc2", "fc3"]
    frozen = models.mlp(8, 2, [4], "tanh", 1.0, [0], bias=False, train_layers=["fc2"])
    assert list(models.trainable_weights(frozen)) == ["fc2"] and frozen.biases == [None, None]


def test_same_seed_same_matrices_scaled_by_sigma():
    a = models.mlp(10, 3, [6], "tanh", 1.0, [5])
    b = models.mlp(10, 3, [6], "tanh", 3.0, [5])
    torch.testing.assert_close(3 * a.weights[0], b.weights[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"activation": "sigmoid"}, "model.activation must be one of tanh, relu, identity (got 'sigmoid')"),
        ({"sigma_w": -1.0}, "model.sigma_w must be > 0 (got -1.0)"),
        ({"train_layers": ["fc9"]}, "model.train_layers must be a subset of fc1, fc2"),
    ],
)
def test_model_bad_input(kwargs, message):
    args = {"activation": "tanh", "sigma_w": 1.0, "train_layers": None, **kwargs}
    with pytest.raises(ConfigError) as err:
        models.mlp(4, 2, [3], args["activation"], args["sigma_w"], [0], train_layers=args["train_layers"])
    assert message in str(err.value)


def test_mse_loss_matches_hand_computation():
    out = torch.tensor([[[1.0, 2.0], [0.0, -1.0], [3.0, 3.0]]])
    y = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 1.0]])
    # 1/2 * mean over the 3 samples of the summed squared errors: (5 + 5 + 4) / 6
    assert loss_per_config(out, y, None, "mse").item() == pytest.approx(14 / 6)
    labels = torch.tensor([[0, 1, 1]])
    logits = out[0]
    manual = -(logits.log_softmax(-1)[torch.arange(3), labels[0]]).mean()
    assert loss_per_config(out, None, labels, "cross_entropy").item() == pytest.approx(manual.item())


def test_sgd_bit_identical_for_the_same_seed_and_seed_dependent():
    ds = data.digits(n_train=200)
    runs = [
        sgd(digits_net(seeds=[s]), ds.x_train, ds.y_train, ds.labels_train, 0.1, 8, 40, [s]).network
        for s in (4, 4, 5)
    ]
    assert all(torch.equal(a, b) for a, b in zip(runs[0].weights, runs[1].weights))
    assert all(torch.equal(a, b) for a, b in zip(runs[0].biases, runs[1].biases))
    assert not torch.equal(runs[0].weights[0], runs[2].weights[0])


def test_one_sgd_step_is_the_hand_update():
    ds = data.digits(n_train=50)
    net = digits_net(seeds=[2])
    result = sgd(net, ds.x_train, ds.y_train, None, 0.3, 10, 1, [2])
    idx = torch.randperm(50, generator=torch.Generator().manual_seed(2))[:10]
    params = [t.clone().requires_grad_(True) for t in net.parameters()]
    out = models.forward(net.with_parameters(params), ds.x_train[idx])
    loss = 0.5 * (out - ds.y_train[idx]).square().sum(-1).mean()
    grads = torch.autograd.grad(loss, params)
    for new, old, g in zip(result.network.parameters(), params, grads):
        torch.testing.assert_close(new, old.detach() - 0.3 * g)
    assert result.losses[0, 0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_stacked_configs_equal_separate_runs_and_divergence_is_contained():
    ds = data.digits(n_train=300)
    lrs, seeds = [0.05, 0.2, 500.0], [1, 2, 3]
    stacked = sgd(digits_net(seeds=seeds), ds.x_train, ds.y_train, None, torch.tensor(lrs), 16, 60, seeds)
    assert stacked.diverged.tolist() == [False, False, True]
    assert stacked.diverged_at[2] >= 0 and torch.isnan(stacked.losses[2, -1])
    assert all(torch.isfinite(w).all() for w in stacked.network.weights)
    for p in range(2):
        alone = sgd(digits_net(seeds=[seeds[p]]), ds.x_train, ds.y_train, None, lrs[p], 16, 60, [seeds[p]])
        for a, b in zip(alone.network.weights, stacked.network.weights):
            torch.testing.assert_close(a[0], b[p], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(alone.losses[0], stacked.losses[p], rtol=1e-5, atol=1e-6)


def test_teacher_student_frozen_parts_unchanged_and_student_learns():
    ds = data.teacher_student(0)
    net = models.teacher_student([ds.teacher], 0.5, [0])
    result = sgd(net, ds.x_train, ds.y_train, None, 0.5, 4, 2000, [0])
    trained = result.network
    assert torch.equal(trained.weights[0][0], ds.teacher["M"]) and torch.equal(trained.weights[2][0], ds.teacher["Z"])
    assert not torch.equal(trained.weights[1], net.weights[1])
    before, _ = evaluate(net, ds.x_val, ds.y_val, None, "mse")
    after, _ = evaluate(trained, ds.x_val, ds.y_val, None, "mse")
    assert after.item() < 0.5 * before.item()


def test_cross_entropy_training_reaches_high_accuracy():
    ds = data.digits()
    result = sgd(digits_net(seeds=[0]), ds.x_train, ds.y_train, ds.labels_train, 0.1, 16, 600, [0], "cross_entropy")
    _, acc = evaluate(result.network, ds.x_val, ds.y_val, ds.labels_val, "cross_entropy")
    assert acc.item() > 0.9


@pytest.mark.parametrize(
    "lr, batch_size, message",
    [
        (0.0, 8, "train.lr must be > 0 (got 0.0)"),
        (0.1, 0, "train.batch_size must be in 1..50 (the training set size) (got 0)"),
        (0.1, 51, "train.batch_size must be in 1..50 (the training set size) (got 51)"),
    ],
)
def test_sgd_bad_hyperparameters(lr, batch_size, message):
    ds = data.digits(n_train=50)
    with pytest.raises(ConfigError) as err:
        sgd(digits_net(), ds.x_train, ds.y_train, None, lr, batch_size, 1, [0])
    assert str(err.value) == message


@pytest.mark.parametrize("activation, kind", [("relu", "cross_entropy"), ("identity", "mse"), ("tanh", "cross_entropy")])
def test_hand_written_gradients_equal_autograd(activation, kind):
    torch.manual_seed(0)
    net = models.mlp(6, 4, [5, 3], activation, 1.5, [0, 1], dtype=torch.float64, train_layers=["fc1", "fc3"])
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 7))
    targets = torch.nn.functional.one_hot(labels, 4).double()
    lp, grads = loss_and_grads(net, x, targets, labels, kind)
    params = [t.clone().requires_grad_(True) for t in net.parameters()]
    expected = loss_per_config(models.forward(net.with_parameters(params), x), targets, labels, kind)
    auto = torch.autograd.grad(expected.sum(), params)
    torch.testing.assert_close(lp, expected.detach(), rtol=1e-12, atol=1e-12)
    assert len(grads) == len(auto) == 4
    for g, a in zip(grads, auto):
        torch.testing.assert_close(g, a, rtol=1e-10, atol=1e-12)
