"""Train the paper's 2×800 tanh MLP with dfa, from zero weights, on the 8×8 digits
bundled with scikit-learn (no download). A stand-in until `feedalign train` lands."""

import torch
from sklearn.datasets import load_digits

import feedalign

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # (1797, 1, 8, 8)
y = torch.tensor(digits.target)
x_train, y_train, x_test, y_test = x[:1497], y[:1497], x[1497:], y[1497:]
model = feedalign.build_model("mlp", (1, 8, 8), 10, gradient="dfa", seed=0)
opt = torch.optim.RMSprop(model.parameters(), lr=1e-4, alpha=0.99, eps=1e-8)
criterion = feedalign.BCE()
for epoch in range(1, 11):
    model.train()
    wrong = 0
    for idx in torch.randperm(len(x_train)).split(64):
        out = model(x_train[idx])
        loss = criterion(out, y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        wrong += (out.argmax(1) != y_train[idx]).sum().item()
    model.eval()
    with torch.no_grad():
        test_err = (model(x_test).argmax(1) != y_test).float().mean().item()
    print(f"epoch {epoch:2d}  train error {wrong / len(x_train):.3f}  test error {test_err:.3f}")
