"""Networks: the backbone registry, the grey-input ``XrayNet`` and where pretrained weights come from."""
