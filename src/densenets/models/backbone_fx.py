"""``feature_cls="fx"``: a backbone as a torch.fx graph of the model, which TorchScript compiles.

torchvision's feature extractor traces the model (once in training mode, once in evaluation
mode) and returns the nodes at the family's backbone taps; torchvision is imported only when
this kind is asked for. The graph keeps the model's module paths, so its state-dict keys are
the model's (less the head).
"""

from collections.abc import Sequence
from typing import Any

from torch import fx, nn
from torchvision.models.feature_extraction import DualGraphModule, create_feature_extractor

from .backbone import describe, out_keys, taps_of


def _return_list(graph: fx.Graph) -> None:
    """The graph's output dict (key -> map, in tap order) as a list of its maps."""
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (list(output.args[0].values()),)
    graph.lint()


class FeatureGraph(DualGraphModule):
    """The maps at the taps as torchvision's feature extractor computes them: a list, or with
    ``return_dict`` a dict keyed by the feature index as a string (or ``out_map``'s names),
    as timm's ``FeatureGraphNet``. Switches graphs with ``train()``/``eval()``."""

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] | None = None,
                 out_map: Sequence[Any] | None = None, return_dict: bool = False) -> None:
        taken, info = taps_of(model, out_indices)
        keys = out_keys(taken, out_map)
        traced = create_feature_extractor(
            model, return_nodes={info[i]["module"]: k for i, k in zip(taken, keys, strict=True)})
        graphs = (traced.train_graph, traced.eval_graph)
        if not return_dict:
            for graph in graphs:
                _return_list(graph)
        super().__init__(model, *graphs, class_name="FeatureGraph")
        describe(self, model, taken, info)
        self.return_dict = return_dict
        self.train(model.training)
