"""Networks: the score U-Net (and, later, the conditional flow)."""
