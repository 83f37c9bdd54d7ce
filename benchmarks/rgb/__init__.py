"""RGB residual-network benchmark: narrow PreAct-ResNet18 and VGG-style models on the
synthetic 3×32×32 task, clean and backdoored, scored by every detector's defaults."""
