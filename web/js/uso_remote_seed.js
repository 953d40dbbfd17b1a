// USO Remote Generate: seed 0 means "the provider picks the seed". ComfyUI's frontend gives every INT
// input named `seed` a control widget that starts at "randomize" (the node cannot choose another
// start from Python), which replaced that 0 after the first run. A fresh node starts at "fixed";
// nodes of saved workflows keep the control they stored (widgets_values are applied after this).
import { app } from "../../../scripts/app.js";

app.registerExtension({
  name: "comfyui-uso.remote-seed-fixed",
  nodeCreated(node) {
    if (node.comfyClass !== "USORemoteGenerate") return;
    const control = node.widgets?.find((widget) => widget.name === "control_after_generate");
    if (control) control.value = "fixed";
  },
});
