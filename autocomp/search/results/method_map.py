"""The per-layer method map of chosen plans: which method, at which strength, each layer
takes in each plan, as a Markdown table and a colour-coded heatmap (one colour per method
family, the setting written in the cell)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocomp.core.inventory import build_inventory
from autocomp.core.staging import replacing, write_text
from autocomp.search.settings import RunSettings

KEEP = "keep"
# Method -> family; each family has one colour. Unknown methods are their own family.
FAMILIES = {"prune": "prune", "lowrank": "low-rank", "substitute": "substitute",
            "sparsity": "sparsity", "quant": "quantize", "binary": "quantize", "ternary": "quantize"}
COLOURS = {KEEP: "#f2f2f2", "prune": "#f4a261", "low-rank": "#7fb3d5", "substitute": "#b39ddb",
           "sparsity": "#d7ccc8", "quantize": "#8fd19e"}
OTHER_COLOURS = ("#ffd54f", "#ef9a9a", "#80cbc4", "#bcaaa4", "#ce93d8")


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _config_text(config: dict[str, Any]) -> str:
    """One method config as a few characters: ``prune 0.4``, ``svd r0.5``, ``w4a8``."""
    method = config.get("method", "?")
    if method == "prune":
        criterion = config.get("criterion", "l1")
        return f"prune {_number(config['ratio'])}" + ("" if criterion == "l1" else f" {criterion}")
    if method == "lowrank":
        kind = config.get("kind", "svd")
        if config.get("energy") is not None:
            return f"{kind} e{_number(config['energy'])}"
        text = f"{kind} r{_number(config['rank'])}"
        return text + (f"/{_number(config['rank_out'])}" if config.get("rank_out") is not None else "")
    if method in ("quant", "binary", "ternary"):
        weights = f"w{config['w_bits']}" if method == "quant" else method
        return weights + (f"a{config['a_bits']}" if config.get("a_bits") is not None else "")
    if method == "substitute":
        return config.get("kind", "dwsep") + (f" g{config['groups']}" if config.get("groups") else "")
    if method == "sparsity":
        return f"sparse {_number(config['sparsity'])}"
    values = " ".join(_number(v) for k, v in config.items() if k != "method")
    return f"{method} {values}".strip()


def layer_configs(plan: dict[str, Any], layer: str) -> list[dict[str, Any]]:
    """The method configs a plan (CompressionPlan JSON) gives a layer; [] when it keeps it."""
    choice = plan.get("layers", {}).get(layer)
    configs = choice if isinstance(choice, list) else [choice] if choice else []
    return [c for c in configs if c.get("method") != KEEP]


def cell_text(configs: list[dict[str, Any]]) -> str:
    """A layer's choice: ``keep``, one config, or configs joined by ``+`` in stage order."""
    return " + ".join(_config_text(c) for c in configs) if configs else KEEP


def family(configs: list[dict[str, Any]]) -> str:
    """The colour family of a choice: ``keep``, the method's family, or a combination."""
    if not configs:
        return KEEP
    return "+".join(dict.fromkeys(FAMILIES.get(c.get("method", "?"), c.get("method", "?"))
                                  for c in configs))


@dataclass
class MethodMap:
    """Layers (rows, in model order) by plans (columns): each cell's text and family."""

    layers: list[str]
    columns: list[str]  # "#N" or "#N label"
    cells: list[list[str]]
    families: list[list[str]]

    def to_markdown(self) -> str:
        header = "| layer | " + " | ".join(self.columns) + " |"
        lines = [header, "|---" * (len(self.columns) + 1) + "|"]
        lines.extend(f"| {layer} | " + " | ".join(row) + " |"
                     for layer, row in zip(self.layers, self.cells, strict=True))
        return "\n".join(lines)

    def colours(self) -> dict[str, str]:
        """Each family present -> its colour, in a stable order (keep first)."""
        present = list(dict.fromkeys(f for row in self.families for f in row))
        known = [f for f in COLOURS if f in present]
        others = sorted(f for f in present if f not in COLOURS)
        spare = {f: OTHER_COLOURS[i % len(OTHER_COLOURS)] for i, f in enumerate(others)}
        return {**{f: COLOURS[f] for f in known}, **spare}

    def plot(self, path: Path, title: str) -> None:
        """A heatmap: one row per layer, one column per plan, coloured by family."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch

        colours = self.colours()
        index = {name: i for i, name in enumerate(colours)}
        grid = [[index[f] for f in row] for row in self.families]
        width = max(5.0, 2.0 + 1.25 * len(self.columns) + 0.06 * max(len(n) for n in self.layers))
        fig, ax = plt.subplots(figsize=(width, 1.6 + 0.32 * len(self.layers)))
        ax.imshow(grid, cmap=ListedColormap(list(colours.values())), vmin=-0.5,
                  vmax=len(colours) - 0.5, aspect="auto")
        for i, row in enumerate(self.cells):
            for j, text in enumerate(row):
                ax.text(j, i, text, ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(self.columns)), self.columns, fontsize=8, rotation=20, ha="right")
        ax.set_yticks(range(len(self.layers)), self.layers, fontsize=7)
        ax.set_xticks([x - 0.5 for x in range(1, len(self.columns))], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, len(self.layers))], minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
        ax.set_title(title, fontsize=10)
        ax.legend(handles=[Patch(facecolor=c, edgecolor="gray", label=f) for f, c in colours.items()],
                  fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method family",
                  title_fontsize=7)
        fig.tight_layout()
        with replacing(path) as temporary:
            fig.savefig(temporary, dpi=120, format="png")
        plt.close(fig)


def build_method_map(layers: list[str], plans: list[tuple[str, dict[str, Any]]]) -> MethodMap:
    """The map of ``plans`` ((column name, CompressionPlan JSON), one column each) over
    ``layers``; layers a plan names that are not in ``layers`` are appended."""
    rows = list(layers)
    rows += [name for _, plan in plans for name in plan.get("layers", {}) if name not in rows]
    choices = [[layer_configs(plan, layer) for _, plan in plans] for layer in rows]
    return MethodMap(rows, [name for name, _ in plans],
                     [[cell_text(c) for c in row] for row in choices],
                     [[family(c) for c in row] for row in choices])


def model_layers(settings: RunSettings) -> list[str]:
    """The run's compressible layers in model order (builds the model once)."""
    return build_inventory(settings.model.build(), settings.input_shape, coupling=False).names


def write_method_map(run_dir: Path, title: str, layers: list[str],
                     plans: list[tuple[str, dict[str, Any]]]) -> tuple[Path, Path]:
    """Write ``method_map.md`` and ``method_map.png`` (both headed ``title``) of ``plans`` over
    ``layers`` (model order, see ``model_layers``) into the run folder."""
    method_map = build_method_map(layers, plans)
    markdown, image = run_dir / "method_map.md", run_dir / "method_map.png"
    write_text(markdown, f"# {title}\n\nEach layer's method and setting in each plan (keep: "
                         "unchanged).\n\n" + method_map.to_markdown() + "\n")
    method_map.plot(image, title)
    return markdown, image
