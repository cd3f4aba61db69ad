// Ready tool sets for the playground's tools editor (OpenAI function-tool objects; the page
// converts them for the Messages and Responses APIs).

const fn = (name, description, properties, required = Object.keys(properties)) => ({
  type: "function",
  function: { name, description, parameters: { type: "object", properties, required } },
});

export const EXAMPLES = [
  {
    id: "weather",
    label: "Weather (one tool)",
    message: "What's the weather in Paris, in celsius?",
    tools: [
      fn("get_weather", "Get the current weather for a city", {
        city: { type: "string", description: "City name, e.g. Paris" },
        unit: { type: "string", enum: ["celsius", "fahrenheit"] },
      }),
    ],
  },
  {
    id: "chinese",
    label: "天气与搜索（中文）",
    message: "北京今天天气怎么样？",
    tools: [
      fn("get_weather", "查询指定城市的实时天气", {
        city: { type: "string", description: "城市名称，例如：北京、上海" },
        unit: { type: "string", enum: ["摄氏度", "华氏度"], description: "温度单位" },
      }, ["city"]),
      fn("search_web", "在网上搜索信息", {
        query: { type: "string", description: "搜索关键词" },
        max_results: { type: "integer", minimum: 1, maximum: 10, description: "最多返回几条结果" },
      }, ["query"]),
    ],
  },
  {
    id: "flight",
    label: "Flight booking (typed, nested)",
    message: "Book 2 economy seats from SFO to Tokyo on 2026-03-14.",
    tools: [
      fn("book_flight", "Book seats on a flight", {
        origin: { type: "string", pattern: "^[A-Z]{3}$", description: "IATA airport code" },
        destination: { type: "string", description: "City or IATA code" },
        date: { type: "string", pattern: "^\\d{4}-\\d{2}-\\d{2}$" },
        passengers: { type: "integer", minimum: 1, maximum: 9 },
        cabin: { type: "string", enum: ["economy", "business", "first"] },
        extras: {
          type: "object",
          properties: { meal: { type: "boolean" }, bags: { type: "integer", minimum: 0 } },
          additionalProperties: false,
        },
      }, ["origin", "destination", "date", "passengers", "cabin"]),
    ],
  },
  {
    id: "parallel",
    label: "Calculator and clock (parallel calls)",
    message: "What is 17 * 23, and what time is it in Tokyo?",
    tools: [
      fn("calculate", "Evaluate an arithmetic expression", {
        expression: { type: "string", description: "e.g. 2 * (3 + 4)" },
      }),
      fn("get_time", "The current time in a time zone", {
        timezone: { type: "string", description: "IANA name, e.g. Asia/Tokyo" },
      }),
    ],
  },
];
