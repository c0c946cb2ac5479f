"""Deployed (already quantized) models: their stored codes as fault sites.

`modules`: the layer forms a quantized graph is lifted into (QuantDequant for activation
codes, stored weight formats on Conv/Linear); `pt2e`: reading torchao PT2E programs;
`onnx_model`: reading ONNX files (float and QDQ) into the same forms; `verify`: replaying
a campaign's faults in the runtime the model ships in.
"""
