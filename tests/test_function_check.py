"""The converted graph computes the model: a module subclass with its own forward is converted as what it
computes, not as its base class (timm's BatchNormAct2d is a BN and then an activation), and `prepare` stops a
graph whose float interpreter is another function than the model."""
import pytest
import torch
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.program.executor import run_program
from hawq_ray.quant.qat import check_function, prepare

SHAPE = (3, 8, 8)


def norm_act_model(conv=nn.Conv2d):
    from timm.layers import BatchNormAct2d

    class NormAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.SiLU)
            self.c2, self.bn2 = conv(8, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.ReLU)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            y = self.bn1(self.c1(x))
            y = self.bn2(y + self.c2(y))          # a BN after a sum: no conv to fold into
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    model = NormAct()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return model.eval()


def test_a_norm_act_module_is_its_batch_norm_then_its_activation():
    model = norm_act_model()
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    qm = prepare(model, "uniform4", SHAPE)
    with torch.no_grad():
        reference = model(x)                                     # BN, then SiLU / ReLU, as timm computes it
        torch.testing.assert_close(qm.set_mode("fp32")(x), reference, rtol=1e-5, atol=1e-5)
    nodes = {n.name: n for n in qm.graph.nodes}
    assert nodes["c1"].bn is model_bn(qm, "bn1")                 # folded into the conv before it (eq. 16)
    assert [n.kind for n in qm.graph.nodes if n.kind in ("batchnorm", "activation", "relu")] == \
        ["activation", "batchnorm", "relu"]                      # SiLU's table; bn2 an affine; its ReLU
    qm.set_mode("qat").calibrate([x]).eval()
    with torch.no_grad():
        out, _ = qm.run(x)
    program = qm.to_integer()
    assert torch.equal(run_program(program, program.quantize_input(x)), out.q)


def model_bn(qm, name):
    return dict(qm.model.named_modules())[name]


def test_a_subclass_computing_another_function_than_its_type_is_stopped():
    class Doubled(nn.Conv2d):                 # converted as the Conv2d it is: half the function
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(HawqError, match="NormAct: the converted graph does not compute the model"):
        prepare(norm_act_model(conv=Doubled), "uniform8", SHAPE)


def test_a_graph_that_computes_another_function_is_stopped():
    qm = prepare(norm_act_model(), "uniform8", SHAPE)
    next(n for n in qm.graph.nodes if n.name == "c1").bn = None      # the conv no longer applies bn1
    with pytest.raises(HawqError, match=r"NormAct: the converted graph does not compute the model \(max \|diff"):
        check_function(qm)
