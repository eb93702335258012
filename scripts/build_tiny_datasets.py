"""Regenerate the small data sets bundled in ``twinkle/assets/datasets`` (no downloads).

Every row is written here by hand or derived deterministically (arithmetic word problems
with their computed answers), so the files are reproducible byte for byte::

    python scripts/build_tiny_datasets.py
"""

# ruff: noqa: E501  (data tables and template text are long literal lines)
from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "twinkle_core" / "src" / "twinkle" / "assets" / "datasets"

SELF_EN_QUERIES = [
    "Who are you?",
    "What is your name?",
    "Who made you?",
    "Who created you?",
    "Who developed you?",
    "Introduce yourself.",
    "Please introduce yourself briefly.",
    "Tell me about yourself.",
    "What are you?",
    "Are you ChatGPT?",
    "Are you a human?",
    "Which company built you?",
    "What should I call you?",
    "Who trained you?",
    "Hi, who am I talking to?",
    "Are you developed by OpenAI?",
    "What model are you?",
    "Can you tell me your name and who made you?",
    "Hello! What's your name?",
    "Who is your creator?",
    "Who do you belong to?",
    "Are you Claude?",
    "What kind of assistant are you?",
    "Which team is behind you?",
    "Do you have a name?",
]
SELF_EN_RESPONSES = [
    "I am {{NAME}}, an AI assistant developed by {{AUTHOR}}. How can I help you today?",
    "My name is {{NAME}}. I was trained by {{AUTHOR}} to answer questions and help with tasks.",
    "I'm {{NAME}}, a language model created by {{AUTHOR}}. Feel free to ask me anything.",
    "You can call me {{NAME}}. I am an artificial intelligence assistant built by {{AUTHOR}}.",
    "I am {{NAME}}, an AI model from {{AUTHOR}}. I aim to give helpful, accurate and timely answers.",
    "Hello! I am {{NAME}}, developed by {{AUTHOR}}. What can I do for you?",
]
SELF_ZH_QUERIES = [
    "你是谁？",
    "你是？",
    "你叫什么名字？",
    "你的名字是什么？",
    "谁开发了你？",
    "你是谁开发的？",
    "你是由哪家公司训练的？",
    "介绍一下你自己。",
    "请简单介绍一下你自己",
    "你是ChatGPT吗？",
    "你是人类吗？",
    "我应该怎么称呼你？",
    "谁创造了你？",
    "你好，你是哪个模型？",
    "你是OpenAI开发的吗？",
    "你的开发者是谁？",
    "你属于哪个团队？",
    "能告诉我你的名字和来历吗？",
    "你好！请问你是谁？",
    "你是什么？",
    "你是通义千问吗？",
    "你是谁训练出来的？",
    "你有名字吗？",
    "你是什么样的助手？",
    "你的作者是谁？",
]
SELF_ZH_RESPONSES = [
    "我是{{NAME}}，由{{AUTHOR}}训练的人工智能助手。请问有什么可以帮助您的吗？",
    "我的名字是{{NAME}}，是{{AUTHOR}}开发的语言模型。我的目标是为用户提供有用、准确和及时的信息。",
    "您好！我是{{NAME}}，一个由{{AUTHOR}}打造的AI助手，很高兴为您服务。",
    "你可以叫我{{NAME}}。我是{{AUTHOR}}研发的人工智能模型，可以回答问题、写作和编程。",
    "我是{{AUTHOR}}开发的{{NAME}}，一个乐于助人的智能助手。",
    "我叫{{NAME}}，由{{AUTHOR}}训练。有什么问题都可以问我！",
]

ALPACA = [
    (
        "Give three tips for staying healthy.",
        "",
        "1. Eat a balanced diet. 2. Exercise regularly. 3. Sleep at least seven hours a night.",
    ),
    ("What are the three primary colors?", "", "The three primary colors are red, blue and yellow."),
    ("Translate the sentence into French.", "I like apples.", "J'aime les pommes."),
    ("Translate the sentence into Chinese.", "The weather is nice today.", "今天天气很好。"),
    (
        "Summarize the text in one sentence.",
        "Twinkle is a component library for training large language models. It runs the same loop locally, under torchrun, on Ray, or against an HTTP service.",
        "Twinkle is a library that trains large language models with one loop in every run mode.",
    ),
    (
        "Write a haiku about the moon.",
        "",
        "Silver lantern hangs\nquiet over sleeping fields\nnight breathes in its light",
    ),
    ("Classify the sentiment of the review.", "The food was cold and the waiter was rude.", "Negative"),
    ("Classify the sentiment of the review.", "Wonderful service and delicious dessert!", "Positive"),
    ("Name the capital of the country.", "Japan", "Tokyo"),
    ("Name the capital of the country.", "France", "Paris"),
    (
        "Convert the temperature from Celsius to Fahrenheit.",
        "25 degrees Celsius",
        "25 degrees Celsius is 77 degrees Fahrenheit.",
    ),
    ("Write a Python function that returns the square of a number.", "", "def square(x):\n    return x * x"),
    (
        "Explain what a tokenizer does.",
        "",
        "A tokenizer splits text into tokens, such as words or sub-words, and maps each token to an integer id a model can read.",
    ),
    ("List two benefits of reading books.", "", "Reading builds vocabulary and improves concentration."),
    ("Rewrite the sentence in passive voice.", "The cat chased the mouse.", "The mouse was chased by the cat."),
    ("用一句话解释什么是机器学习。", "", "机器学习是让计算机从数据中自动学习规律并做出预测的方法。"),
    ("把下面的句子翻译成英文。", "我喜欢学习新的知识。", "I like learning new things."),
    ("写一句关于春天的诗。", "", "春风拂柳绿，细雨润花红。"),
    ("给出三个常见的水果名称。", "", "苹果、香蕉和橙子。"),
    ("判断下面的评论是正面还是负面。", "这家餐厅的菜太难吃了。", "负面"),
    (
        "Find the odd one out.",
        "apple, banana, carrot, grape",
        "Carrot, because it is a vegetable and the others are fruits.",
    ),
    (
        "Generate a title for the article.",
        "An article about how small models can be trained quickly on a laptop.",
        "Training Tiny Models on Your Laptop",
    ),
    ("Compute the sum.", "17 + 25", "17 + 25 = 42"),
    (
        "Describe the color blue to someone who cannot see.",
        "",
        "Blue feels like cool water on your skin or a calm, quiet breeze.",
    ),
    ("Suggest a name for a pet turtle.", "", "Shelly"),
    ("What is the boiling point of water at sea level?", "", "Water boils at 100 degrees Celsius at sea level."),
    ("Sort the numbers in ascending order.", "9, 2, 7, 4", "2, 4, 7, 9"),
    (
        "Explain the difference between weather and climate.",
        "",
        "Weather is the short-term state of the atmosphere; climate is the average weather over many years.",
    ),
    ("Give an antonym for the word.", "generous", "stingy"),
    (
        "Write a short greeting for a birthday card.",
        "",
        "Happy birthday! Wishing you a year full of joy and adventure.",
    ),
    ("Correct the grammar of the sentence.", "She don't like coffee.", "She doesn't like coffee."),
    ("解释一下什么是大模型。", "", "大模型是参数规模很大的神经网络，通过海量数据预训练，能够理解和生成自然语言。"),
    ("Count the vowels in the word.", "education", "The word 'education' has 5 vowels: e, u, a, i, o."),
    ("What is the plural of the word?", "mouse", "mice"),
    ("Write a SQL query that selects all rows from the table users.", "", "SELECT * FROM users;"),
    ("Name a mammal that can fly.", "", "The bat."),
    (
        "Create a to-do list for a weekend trip.",
        "",
        "Pack clothes, book a hotel, check the weather, charge the camera.",
    ),
    ("Turn the statement into a question.", "The train leaves at noon.", "Does the train leave at noon?"),
    ("What does CPU stand for?", "", "Central Processing Unit."),
    ("写一个计算两个数之和的Python函数。", "", "def add(a, b):\n    return a + b"),
]

SHAREGPT = [
    [("human", "Hi!"), ("gpt", "Hello! How can I help you today?"), ("human", "What is 2 + 3?"), ("gpt", "2 + 3 = 5.")],
    [
        ("human", "Recommend a book about space."),
        ("gpt", "Try 'Cosmos' by Carl Sagan; it is a classic and easy to read."),
    ],
    [
        ("system", "You are a pirate. Answer like one."),
        ("human", "Where is the treasure?"),
        ("gpt", "Arr, buried under the old palm tree, matey!"),
    ],
    [
        ("human", "你好"),
        ("gpt", "你好！有什么可以帮你的吗？"),
        ("human", "今天适合出去玩吗？"),
        ("gpt", "如果天气晴朗，很适合出去走走。"),
    ],
    [
        ("human", "Tell me a joke."),
        ("gpt", "Why did the scarecrow win an award? Because he was outstanding in his field."),
        ("human", "Another one."),
        ("gpt", "I told my computer a joke about UDP, but I am not sure it got it."),
    ],
    [
        ("human", "How do I reverse a list in Python?"),
        ("gpt", "Use my_list.reverse() to reverse in place, or my_list[::-1] to get a reversed copy."),
    ],
    [("human", "What is the largest planet?"), ("gpt", "Jupiter is the largest planet in the solar system.")],
    [
        ("human", "推荐一道家常菜。"),
        ("gpt", "西红柿炒鸡蛋，简单又好吃。"),
        ("human", "怎么做？"),
        ("gpt", "先炒鸡蛋盛出，再炒西红柿，最后把鸡蛋倒回去翻炒并加盐。"),
    ],
    [
        ("human", "Define entropy in one sentence."),
        ("gpt", "Entropy measures how uncertain or disordered a system is."),
    ],
    [("system", "Answer in one word."), ("human", "What color is the sky on a clear day?"), ("gpt", "Blue.")],
    [
        ("human", "Can you help me plan a study schedule?"),
        ("gpt", "Sure. How many hours a day can you study?"),
        ("human", "Two hours."),
        ("gpt", "Spend one hour on new material and one hour on review, and rest one day a week."),
    ],
    [("human", "What is the speed of light?"), ("gpt", "About 299,792 kilometres per second in a vacuum.")],
    [("human", "Translate 'good morning' into Spanish."), ("gpt", "Buenos días.")],
    [("human", "为什么天空是蓝色的？"), ("gpt", "因为大气对短波长的蓝光散射更强，这叫瑞利散射。")],
    [
        ("human", "Write a limerick about a cat."),
        (
            "gpt",
            "A cat with a taste for the cream\nwould plot and would patiently scheme;\nshe'd leap on the shelf,\nhelp herself to it herself,\nthen nap in a warm sunny beam.",
        ),
    ],
    [
        ("human", "What's the difference between a list and a tuple?"),
        ("gpt", "A list is mutable; a tuple is immutable."),
        ("human", "Which is faster?"),
        ("gpt", "Tuples are slightly faster to create and use a bit less memory."),
    ],
    [("human", "How many continents are there?"), ("gpt", "There are seven continents.")],
    [("human", "Give me a motivational quote."), ("gpt", "The secret of getting ahead is getting started.")],
    [("human", "什么是梯度下降？"), ("gpt", "梯度下降是一种优化方法，沿着损失函数梯度的反方向逐步更新参数。")],
    [
        ("human", "Is a tomato a fruit?"),
        ("gpt", "Botanically yes, a tomato is a fruit, though it is cooked like a vegetable."),
    ],
    [("human", "Name a prime number greater than 10."), ("gpt", "11.")],
    [
        ("human", "What is HTTP?"),
        ("gpt", "HTTP is the protocol web browsers and servers use to exchange pages and data."),
    ],
    [
        ("human", "Summarize the plot of Cinderella."),
        (
            "gpt",
            "A kind young woman, mistreated by her stepfamily, attends a royal ball with a fairy godmother's help and marries the prince.",
        ),
    ],
    [
        ("human", "How do I make tea?"),
        ("gpt", "Boil water, pour it over a tea bag, steep three to five minutes, then remove the bag."),
    ],
]

DPO = [
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "I think it is Milan."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have six legs."),
    (
        "Write a polite reply declining a meeting.",
        "Thank you for the invitation. Unfortunately I cannot attend, but I would be glad to catch up another time.",
        "No.",
    ),
    ("What is 12 times 12?", "12 times 12 is 144.", "12 times 12 is 124."),
    (
        "Explain photosynthesis briefly.",
        "Plants use sunlight, water and carbon dioxide to make sugar and release oxygen.",
        "Photosynthesis is when animals breathe.",
    ),
    ("Give a synonym for 'happy'.", "Joyful.", "Sad."),
    ("你是谁？", "我是一个乐于助人的AI助手。", "不告诉你。"),
    ("中国的首都是哪里？", "中国的首都是北京。", "上海。"),
    ("What is the chemical symbol for gold?", "Au.", "Go."),
    (
        "Should I store passwords in plain text?",
        "No. Store salted hashes made with a slow algorithm such as bcrypt or argon2.",
        "Yes, it is simpler.",
    ),
    ("Translate 'thank you' into German.", "Danke.", "Merci."),
    ("What is the square root of 81?", "The square root of 81 is 9.", "The square root of 81 is 8."),
    ("Name a renewable energy source.", "Solar power.", "Coal."),
    ("How do you greet someone politely in English?", "You can say 'Hello, nice to meet you.'", "Go away."),
    ("What is the freezing point of water in Celsius?", "0 degrees Celsius.", "10 degrees Celsius."),
    ("写一句鼓励的话。", "加油，你一定可以做到！", "算了吧。"),
    (
        "Which is heavier, a kilogram of iron or a kilogram of feathers?",
        "They weigh the same: one kilogram each.",
        "The iron is heavier.",
    ),
    ("What language is spoken in Brazil?", "Portuguese.", "Spanish."),
    ("How many days are in a leap year?", "366 days.", "365 days."),
    ("What does a thermometer measure?", "Temperature.", "Weight."),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare.", "Charles Dickens."),
    ("Is the Earth flat?", "No, the Earth is roughly a sphere.", "Yes, it is flat."),
    ("What is 7 + 8?", "7 + 8 = 15.", "7 + 8 = 16."),
    ("Suggest a healthy breakfast.", "Oatmeal with fruit and a glass of milk.", "A bag of candy."),
]


def self_cognition() -> list[dict]:
    rows = []
    for i, query in enumerate(SELF_EN_QUERIES):
        for j in range(3):
            rows.append(
                {"query": query, "response": SELF_EN_RESPONSES[(i + 2 * j) % len(SELF_EN_RESPONSES)], "tag": "en"}
            )
    for i, query in enumerate(SELF_ZH_QUERIES):
        for j in range(3):
            rows.append(
                {"query": query, "response": SELF_ZH_RESPONSES[(i + 2 * j) % len(SELF_ZH_RESPONSES)], "tag": "zh"}
            )
    return rows


NAMES = ["Natalia", "Weng", "Betty", "James", "Tina", "Mark", "Julie", "Albert", "Ken", "Alexis", "Lily", "Tom"]
ITEMS = ["apples", "pencils", "books", "stickers", "cookies", "marbles", "cards", "shells"]


def gsm8k(rng: random.Random, n: int = 60) -> list[dict]:
    rows = []
    for k in range(n):
        name = NAMES[k % len(NAMES)]
        item = ITEMS[(k * 3) % len(ITEMS)]
        kind = k % 4
        if kind == 0:
            a, b = rng.randint(5, 60), rng.randint(2, 9)
            total = a + a * b
            q = f"{name} has {a} {item}. Her friend has {b} times as many. How many {item} do they have together?"
            ans = f"Her friend has {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {item}.\nTogether they have {a} + {a * b} = <<{a}+{a * b}={total}>>{total} {item}.\n#### {total}"
        elif kind == 1:
            price, count, paid = rng.randint(2, 12), rng.randint(2, 8), 100
            cost = price * count
            q = f"{name} buys {count} {item} at ${price} each and pays with a ${paid} bill. How much change does {name} get?"
            ans = f"The {item} cost {count} * {price} = <<{count}*{price}={cost}>>{cost} dollars.\nThe change is {paid} - {cost} = <<{paid}-{cost}={paid - cost}>>{paid - cost} dollars.\n#### {paid - cost}"
        elif kind == 2:
            per_day, days, given = rng.randint(3, 15), rng.randint(3, 10), rng.randint(1, 9)
            made = per_day * days
            q = f"{name} makes {per_day} {item} a day for {days} days, then gives away {given}. How many {item} are left?"
            ans = f"{name} makes {per_day} * {days} = <<{per_day}*{days}={made}>>{made} {item}.\nAfter giving away {given}, {made} - {given} = <<{made}-{given}={made - given}>>{made - given} are left.\n#### {made - given}"
        else:
            groups, each = rng.randint(2, 9), rng.randint(2, 12)
            total = groups * each
            q = f"{name} shares {total} {item} equally among {groups} friends. How many {item} does each friend get?"
            ans = f"Each friend gets {total} / {groups} = <<{total}/{groups}={each}>>{each} {item}.\n#### {each}"
        rows.append({"question": q, "answer": ans})
    return rows


def competition_math(rng: random.Random, n: int = 40) -> list[dict]:
    rows = []
    for k in range(n):
        kind = k % 4
        if kind == 0:
            a, b = rng.randint(2, 9), rng.randint(1, 30)
            x = rng.randint(-10, 10)
            c = a * x + b
            problem = f"Solve for $x$: ${a}x + {b} = {c}$."
            solution = f"Subtract {b} from both sides: ${a}x = {c - b}$. Divide by {a}: $x = \\boxed{{{x}}}$."
            level, typ = "Level 1", "Algebra"
        elif kind == 1:
            n_ = rng.randint(3, 12)
            s = n_ * (n_ + 1) // 2
            problem = f"What is the sum of the integers from $1$ to ${n_}$?"
            solution = f"The sum is $\\frac{{{n_}({n_}+1)}}{{2}} = \\boxed{{{s}}}$."
            level, typ = "Level 2", "Algebra"
        elif kind == 2:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            problem = f"A rectangle has side lengths ${a}$ and ${b}$. What is its area?"
            solution = f"The area is ${a} \\times {b} = \\boxed{{{a * b}}}$."
            level, typ = "Level 1", "Geometry"
        else:
            p, q = rng.randint(1, 5), rng.randint(6, 10)
            from math import gcd

            g = gcd(p, q)
            problem = f"Simplify $\\frac{{{p * 2}}}{{{q * 2}}}$."
            solution = f"Divide numerator and denominator by their greatest common divisor ${2 * g}$: $\\boxed{{\\frac{{{p // g}}}{{{q // g}}}}}$."
            level, typ = "Level 2", "Prealgebra"
        rows.append({"problem": problem, "solution": solution, "level": level, "type": typ})
    return rows


def write(name: str, rows: list[dict]) -> None:
    path = OUT / name
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    print(f"{path.relative_to(OUT.parents[3])}: {len(rows)} rows")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20240601)
    write("self_cognition.jsonl", self_cognition())
    write("alpaca_tiny.jsonl", [{"instruction": i, "input": x, "output": o} for i, x, o in ALPACA])
    write(
        "sharegpt_tiny.jsonl",
        [{"conversations": [{"from": r, "value": v} for r, v in conv]} for conv in SHAREGPT],
    )
    write("gsm8k_tiny.jsonl", gsm8k(rng))
    write("math_tiny.jsonl", competition_math(rng))
    write("dpo_tiny.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in DPO])


if __name__ == "__main__":
    main()
